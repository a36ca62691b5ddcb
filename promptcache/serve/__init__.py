"""``promptcache serve``: an OpenAI-compatible HTTP server over one :class:`~promptcache.PromptCache`.

* :mod:`.scheduler` -- the engine thread: bounded queue, batched decode steps, cancellation;
* :mod:`.app` -- the FastAPI application (generation, models, health, metrics endpoints);
  :mod:`.schemas` -- the schema endpoints; :mod:`.errors` -- OpenAI-shaped errors, key and body gates;
* :mod:`.protocol` -- request and response models; :mod:`.metrics` -- Prometheus metrics;
* :mod:`.auth` -- API and admin keys; :mod:`.config` -- the server's settings.

Nothing here is imported by ``promptcache`` itself: the ``serve`` extra (fastapi, uvicorn,
prometheus_client) is needed only to serve.
"""
