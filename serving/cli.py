"""`sessionserve serve | chat | model prepare`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from serving.config import Config
    from serving.server.direct_ingress import ClusterMode

app = typer.Typer(help="Session-aware LLM inference server.", no_args_is_help=True, add_completion=False)
model_app = typer.Typer(help="Manage models.", no_args_is_help=True)
app.add_typer(model_app, name="model")
console = Console()

APP_NAME = "sessionserve"
ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (configs/default.yaml)")]


class IngressOption(str, Enum):
    auto = "auto"
    proxy = "proxy"
    direct = "direct"
    replica = "replica"
    haproxy = "haproxy"


def resolve_ingress(settings: Config, *, joined: ClusterMode | None) -> tuple[Config, str | None]:
    """`settings` with serving.ingress resolved for the Ray we start (`joined` None) or the cluster we joined, or
    why the mode it resolves to cannot serve them."""
    import os

    from pydantic import ValidationError

    from serving.server import direct_ingress

    http = settings.serving
    mode = direct_ingress.resolve(http.ingress, joined=joined, env=os.environ, ingress_replicas=http.ingress_replicas)
    try:
        return settings.with_ingress(mode), None
    except ValidationError as error:
        reason = str(error.errors()[0]["msg"]).removeprefix("Value error, ")
        return settings, f"serving.ingress {http.ingress} resolves to {mode} here, and {reason}"


@app.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="bind address (overrides config)")] = None,
    port: Annotated[int | None, typer.Option(help="port (overrides config)")] = None,
    address: Annotated[
        str | None, typer.Option(envvar="RAY_ADDRESS", help="join this Ray cluster (host:port) instead of a local one")
    ] = None,
    ingress: Annotated[
        IngressOption | None,
        typer.Option(
            help="auto (default): direct on a Ray this starts, the cluster's own mode on one it joins; proxy: through "
            "Ray Serve's HTTP proxy; direct: the ingress replica serves HTTP itself; replica: the one model replica "
            "serves HTTP itself; haproxy: HAProxy on the port, in front of the ingress"
        ),
    ] = None,
) -> None:
    """Start Ray Serve with the ingress and model deployments, and serve until interrupted."""
    from serving.config import load_config
    from serving.server import direct_ingress, lifecycle

    overrides = {"host": host, "port": port, "ingress": ingress.value if ingress else None}
    settings = load_config(config, {"serving": {k: v for k, v in overrides.items() if v}})
    problem = None
    if not address:
        settings, problem = resolve_ingress(settings, joined=None)
        problem = problem or direct_ingress.prepare_local_ray(
            settings.serving.ingress, settings.serving.host, settings.serving.port
        )
    if problem:
        typer.echo(f"refusing to start: {problem}", err=True)
        raise typer.Exit(code=2)

    import ray
    from ray import serve as ray_serve

    from serving.logs import configure_logging
    from serving.model_files import SMOLLM2, smollm2_prepared
    from serving.server import cluster
    from serving.server.builder import build_app

    configure_logging(settings.serving.log_format)
    started_ray = cluster.connect(address)
    stop = lifecycle.StopSignal().install()
    if address:
        joined = direct_ingress.cluster_mode()
        settings, problem = resolve_ingress(settings, joined=joined)
        if problem or (problem := direct_ingress.mismatch(settings.serving.ingress, joined, address)):
            ray.shutdown()
            typer.echo(f"refusing to start: {problem}", err=True)
            raise typer.Exit(code=2)
    http = settings.serving
    store = settings.sessions.store_url()
    check = cluster.check_store(cluster.current_nodes(), store, starting=True)
    if check.level == "error":
        ray.shutdown()
        typer.echo(check.message, err=True)
        raise typer.Exit(code=2)
    watch = cluster.NodeWatch(store, warn=lambda message: typer.echo(f"warning: {message}", err=True)).start()
    if settings.model.name == SMOLLM2 and not smollm2_prepared():
        from serving.models import prepare_smollm2  # torch: only to convert, once per machine

        prepare_smollm2()  # here, not inside every replica
    ray_serve.start(
        http_options=direct_ingress.http_options(
            http.ingress, http.host, http.port, request_timeout_s=http.request_timeout_s
        )
    )
    deploy = lifecycle.DeployWatch(
        lambda: lifecycle.deploy_app(build_app(settings), APP_NAME), lambda: lifecycle.app_status(APP_NAME), stop.event
    ).start()
    served_port: int | None = http.port
    if direct_ingress.serves_directly(http.ingress):
        served_port = direct_ingress.wait_ingress_port(APP_NAME, stop.event, check=deploy.check)
        if served_port is not None and served_port != http.port:
            console.print(
                f"direct ingress: the cluster gave the ingress port {served_port} (its "
                f"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT range), not serving.port {http.port}",
                soft_wrap=True,
            )
    url = f"http://{'127.0.0.1' if http.host in ('0.0.0.0', '::') else http.host}:{served_port}"
    ready = served_port is not None and lifecycle.wait_ready(url, stop.event, check=deploy.check)
    if ready:
        via = {
            "proxy": "Ray Serve's proxy",
            "direct": "direct ingress",
            "replica": "the model replica itself",
            "haproxy": "HAProxy in front of the ingress",
        }[http.ingress]
        console.print(
            f"[green]sessionserve ready[/] on {url} ({via}; Ctrl-C or SIGTERM drains and stops)", soft_wrap=True
        )
        while not stop.event.wait(1.0):  # timed: a signal is noticed within a second whatever the lock semantics
            pass
    watch.stop()
    grace = http.shutdown_grace_s if ready else None
    console.print(f"stopping: draining running turns for up to {http.shutdown_grace_s:g} s" if ready else "stopping")
    lifecycle.shutdown(APP_NAME, grace, started_ray=started_ray, host=http.host, port=served_port or http.port)
    if deploy.error is not None:
        typer.echo(f"sessionserve could not start: {deploy.error}", err=True)
        raise typer.Exit(code=1)
    console.print("stopped")


@app.command()
def chat(
    url: Annotated[str, typer.Option(help="server URL")] = "http://127.0.0.1:8000",
    local: Annotated[bool, typer.Option("--local", help="run the model in-process instead of over HTTP")] = False,
    config: ConfigOption = None,
    session_id: Annotated[str | None, typer.Option(help="resume this session (created if it does not exist)")] = None,
    system_prompt: Annotated[str | None, typer.Option(help="system prompt of new sessions")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    api_key: Annotated[str | None, typer.Option(envvar="SESSIONSERVE_API_KEY")] = None,
) -> None:
    """Chat in the terminal, streaming replies; /help lists the commands. /quit or Ctrl-D leaves; sessions stay."""
    import httpx

    from serving.chat_repl import ChatREPL
    from serving.client import LocalClient, SessionClient
    from serving.server.protocol import APIError

    if local:
        from serving.config import load_config

        client: LocalClient | SessionClient = LocalClient(load_config(config))
    else:
        client = SessionClient(url, api_key=api_key)
    try:
        ChatREPL(client, console, system_prompt=system_prompt, max_new_tokens=max_new_tokens).run(session_id)
    except APIError as error:  # the session could not be opened (wrong key, server draining, ...)
        typer.echo(f"error: {error.message}", err=True)
        raise typer.Exit(code=1) from None
    except httpx.TransportError as error:
        typer.echo(f"error: cannot reach {url}: {error}", err=True)
        raise typer.Exit(code=1) from None
    finally:
        client.close()


@model_app.command("prepare")
def prepare(name: Annotated[str, typer.Argument(help="model name")] = "builtin:smollm2-135m-instruct") -> None:
    """Convert/download a model once so serving starts fast."""
    from serving.models import SMOLLM2, prepare_smollm2

    if name != SMOLLM2:
        console.print(f"nothing to prepare for {name}: Hugging Face ids and folders load directly")
        return
    folder = prepare_smollm2()
    console.print(f"[green]ready[/] {name} -> {folder}")


if __name__ == "__main__":
    app()
