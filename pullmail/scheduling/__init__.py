"""
When work runs: retry schedules as pure functions of stored facts
(L{schedule}) and one timer for many due times (L{timers}).

May import: the standard library and Twisted only.
"""
