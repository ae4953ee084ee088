"""Preloaded by the launcher's forkserver (``multiprocessing.set_forkserver_preload``): the
forkserver ignores SIGTERM.

A SIGTERM to the whole process group (``timeout``, ``kill -TERM -<pgid>``, a scheduler's
stop) reaches the launcher, the ranks and the forkserver the ranks were forked from. The ranks
stop cleanly (finish the step, write a checkpoint); the launcher waits for them. But a
forkserver that dies at once takes with it what the launcher knows of its ranks (their exit
status is read through it), so the launcher took them for gone, exited, and its ranks were
killed mid-checkpoint (measured: the newest checkpoint was the one before the signal). The
forkserver still exits with the launcher (it reads EOF from it). A rank undoes this first
thing (:func:`multitoken.train.launch` resets SIGTERM in every rank).
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
