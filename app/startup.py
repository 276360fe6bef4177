"""The checks before serving, shared by `python -m app check`, `serve` and the app factory: each
problem is one line that says what is wrong and what to do."""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from app.config import ConfigError, Settings, load_settings
from app.db import create_db_engine, current_revision, describe_db_error, head_revision, ping

if TYPE_CHECKING:
    from app.inference.contract import Engine


class StartupError(Exception):
    """Cannot serve; str() is the one line to print."""


def settings_or_problems() -> tuple[Settings | None, list[str]]:
    try:
        settings = load_settings()
    except ConfigError as error:
        return None, error.problems
    return settings, settings.serving_problems()


def database_problems(settings: Settings) -> list[str]:
    engine = create_db_engine(settings, pool=False)
    try:
        ping(engine)
    except SQLAlchemyError as error:
        return [describe_db_error(error)]
    finally:
        engine.dispose()
    revision, head = current_revision(settings.database_url), head_revision()
    if revision != head:
        return [
            f"database schema is at revision {revision or 'none'}, this version needs {head}: "
            "run `python -m app migrate`"
        ]
    return []


def port_problem(host: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return (
                    f"port {port} on {host} is already in use (another zeus-api instance?): pick another port"
                )
            return f"cannot listen on {host}:{port}: {error.strerror}"
    return None


def load_engine(settings: Settings) -> Engine:
    """The model, loaded by the engine ZEUS_ENGINE names; every failure is one StartupError line."""
    from app.inference.factory import create_engine
    from app.inference.types import ModelLoadError

    assert settings.model_path is not None
    try:
        return create_engine(settings)
    except ModelLoadError as error:
        line = " ".join(str(error).split())
        if "out of memory" not in line.lower() and "cannot allocate memory" in line.lower():
            # ENOMEM from mmap or malloc is the same condition as an OOM error, said differently.
            raise StartupError(
                f"out of memory while loading the model from {settings.model_path}: {line}"
            ) from None
        raise StartupError(f"model not loaded: {line}") from None
    except MemoryError:
        raise StartupError(
            f"out of memory while loading the model from {settings.model_path}: use a smaller model, "
            "fewer instances per host, or a smaller ZEUS_MAX_BATCH_SIZE"
        ) from None
    except (RuntimeError, OSError, ValueError) as error:
        line = " ".join(str(error).split())[:300]
        if "out of memory" in line.lower():
            raise StartupError(
                f"out of memory while loading the model on {settings.device}: {line}"
            ) from None
        raise StartupError(f"model not loaded from {settings.model_path}: {line}") from None
