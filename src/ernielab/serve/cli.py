"""`ernielab serve`: start the image server (FastAPI + uvicorn) on the bundled model or a pipeline folder."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from ernielab.core.cli import UserError, user_errors
from ernielab.serve.hosts import allowed_hosts_for, is_loopback

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
@user_errors
def serve(model: Optional[Path] = typer.Option(None, help="pipeline folder (default: the bundled model)"),
          host: str = typer.Option("127.0.0.1", help="address to bind (default: this machine only)"),
          port: int = typer.Option(8000, help="TCP port"),
          device: str = typer.Option("cpu", help="torch device for the model"),
          max_batch: int = typer.Option(8, "--max-batch", help="most images denoised in one pipeline call"),
          queue_size: int = typer.Option(64, "--queue-size", help="most requests waiting; more get 429"),
          timeout: float = typer.Option(300.0, "--timeout", help="seconds a request may take in all (then 504)"),
          api_key: Optional[str] = typer.Option(None, "--api-key", envvar="ERNIELAB_API_KEY",
                                                help="require Authorization: Bearer KEY on /v1/*"),
          enhancer: Optional[Path] = typer.Option(None, "--enhancer",
                                                  help="prompt enhancer folder (default: the bundled one)"),
          max_side: int = typer.Option(256, "--max-side",
                                       help="largest width or height accepted (time and memory grow fast with it)"),
          max_steps: int = typer.Option(200, "--max-steps", help="most sampling steps accepted"),
          batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms",
                                              help="how long the worker waits for more requests to batch"),
          threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)"),
          allow_host: Optional[List[str]] = typer.Option(
              None, "--allow-host", help="another Host name to answer (repeatable); a server bound to localhost "
              "answers only localhost, 127.0.0.1 and [::1] otherwise (against DNS rebinding)")):
    """Serve the model: OpenAI-compatible POST /v1/images/generations, POST /v1/generate (?stream=true for
    server-sent progress, ?async=true for a job id; GET /v1/jobs/ID/events), GET /v1/models, /health, /metrics
    and a web page at /."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not 0 < port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {port}")
    for name, value in (("--max-batch", max_batch), ("--queue-size", queue_size), ("--max-side", max_side),
                        ("--max-steps", max_steps)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    if timeout <= 0 or batch_wait_ms < 0:
        raise UserError("--timeout must be > 0 and --batch-wait-ms >= 0")
    allowed = allowed_hosts_for(host, [h.strip() for h in allow_host or [] if h.strip()])
    if enhancer is not None and not enhancer.is_dir():
        raise UserError(f"--enhancer {enhancer}: no such folder")
    import torch
    import uvicorn

    from ernielab.enhancer.model import PromptEnhancer
    from ernielab.image.pipeline import TextToImagePipeline
    from ernielab.serve.app import ServerLimits, create_app

    if threads is not None:
        torch.set_num_threads(max(1, threads))
    pipe = TextToImagePipeline.from_pretrained(model, device=device)
    name = "ernielab-default" if model is None else model.resolve().name
    app_ = create_app(pipe, model_name=name, max_batch=max_batch, queue_size=queue_size, timeout=timeout,
                      api_key=api_key, batch_wait=batch_wait_ms / 1000,
                      enhancer_factory=lambda: PromptEnhancer.from_pretrained(enhancer, device=device),
                      limits=ServerLimits(max_side=max_side, max_steps=max_steps), allowed_hosts=allowed)
    if not is_loopback(host) and api_key is None:
        typer.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
    typer.echo(f"ernielab serve: model {name} on http://{host}:{port}/ (max batch {max_batch}, "
               f"queue {queue_size})", err=True)
    uvicorn.run(app_, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
