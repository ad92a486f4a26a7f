"""
When work runs: retry schedules as pure functions of stored facts
(L{schedule}), one timer for many due times (L{timers}), the one
dispatcher handing out sessions and connections under per-key and total
caps (L{dispatch}), a sliding window of events per key (L{rate}), and a
bounded cache of values each kept until its own deadline (L{expiring}).

May import: the standard library and Twisted only.
"""
