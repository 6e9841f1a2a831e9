"""Models served by other processes, as pool entries like any other.

* Sharded (:mod:`.sharded`, :mod:`.worker`): ``pool.load(ref, hosts=[...])`` starts ``mlx.launch``, which
  runs this package's worker on every host; the ranks hold the model sharded with mlx-lm
  (``sharded_load``, tensor or pipeline parallel) and decode in lockstep, rank 0 answering the kernel over
  a localhost socket (:mod:`.protocol`).
* Attached (:mod:`.attached`): ``pool.attach(name, base_url=...)`` proxies to an OpenAI-compatible server.

Both are remote runners (:mod:`.remote`): the pool submits a request to them instead of to its engine,
and they answer with the engine's events from their own I/O thread.
"""
