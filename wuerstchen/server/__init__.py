"""The web UI and HTTP API (`wuerstchen serve`): FastAPI + uvicorn, installed with `pip install 'wuerstchen[serve]'`.

- `app.py`: the job queue (one pipeline, one worker thread) and the OpenAI-compatible and native APIs;
- `ui.py`: the single-page web UI served at `/`;
- `preview.py`: the cheap Stage C preview (a fitted linear map, not a decode).
"""
