"""Tornado and asyncio tuning: each module replaces one default behaviour of Tornado,
asyncio or CPython that costs a streaming relay too much, says which, why, and which
versions it was checked against (re-check on every upgrade; each has its own test).

accept_guard   accepting at the open-file limit without spinning
coarse_timers  shared time slots instead of one loop timer per deadline
direct_write   an SSE body written straight to the socket instead of flush()
gc_schedule    full garbage collections on a timer instead of on heap growth
lean_streams   smaller IOStream queues and header sets per open connection
"""
