"""Emu3 as an HTTP service on Ray Serve: OpenAI-shaped image and chat endpoints, requests batched across clients,
SSE streaming, backpressure (503 + Retry-After) and replicas.

    app.py       the deployment (one model per replica) and its FastAPI routes; build_app for `serve run`
    batcher.py   jobs from concurrent requests -> one generation per compatible group, stepped and streamed
    protocol.py  request bodies -> jobs, results -> response bodies and SSE frames, errors -> status codes
    cli.py       `emu3-rt serve` / `python -m runtime.serve`
    client.py    a small stdlib-only client
    config.yaml  `serve run runtime/serve/config.yaml`
"""
