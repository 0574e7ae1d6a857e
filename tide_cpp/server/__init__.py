"""`tide-cli serve`: an OpenAI-compatible HTTP server for one model, with a live web page.

    errors.py   OpenAI-shaped errors ({"error": {"message", "type", "param", "code"}})
    schemas.py  request bodies checked field by field into plain parameters
    engine.py   the one worker thread that owns the model; a bounded queue of jobs
    sse.py      server-sent events framing
    app.py      the FastAPI application: routes, authentication, the web page
    web/        the page at `/` (static HTML, JS, CSS; no build step, nothing external)

FastAPI and uvicorn are an optional extra (`pip install 'tide_cpp[server]'`); nothing here
imports torch.
"""
