"""The endpoint groups of `ernielab serve`, one module each; every `router(...)` returns a FastAPI APIRouter."""
