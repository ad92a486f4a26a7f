"""
When work runs: retry schedules as pure functions of stored facts
(L{schedule}), one timer for many due times (L{timers}), the one
dispatcher handing out sessions and connections under per-key and total
caps (L{dispatch}), and a sliding window of events per key (L{rate}).

May import: the standard library and Twisted only.
"""
