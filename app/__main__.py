"""The Zeus command line: `python -m app {serve,migrate,check,create-user,create-api-key,reset-password}`.

Settings come from ZEUS_* environment variables (or --env-file). Problems print one line each on
stderr and exit non-zero; create-api-key and reset-password print only the secret on stdout.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from pathlib import Path

EXIT_PROBLEM = 1
EXIT_EXISTS = 3


def _fail(lines: list[str] | str, code: int = EXIT_PROBLEM) -> int:
    for line in [lines] if isinstance(lines, str) else lines:
        print(f"zeus: {line}", file=sys.stderr)
    return code


def _settings(env_file: Path | None):
    from app.config import ConfigError, load_settings

    try:
        return load_settings(env_file), []
    except ConfigError as error:
        return None, error.problems


def _session(settings):
    from app.db import create_db_engine, session_factory

    return session_factory(create_db_engine(settings, pool=False))


def cmd_serve(args: argparse.Namespace) -> int:
    os.environ["ZEUS_HOST"], os.environ["ZEUS_PORT"] = args.host, str(args.port)
    settings, problems = _settings(args.env_file)
    if settings is None:
        return _fail(problems)
    from app.startup import StartupError, database_problems, load_engine, port_problem

    problems = settings.serving_problems()
    if not problems:
        problems += database_problems(settings)
    if port := port_problem(args.host, args.port):
        problems.append(port)
    if problems:
        return _fail(problems)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = load_engine(settings)
    except StartupError as error:
        return _fail(str(error))
    import uvicorn

    from app.main import build_app

    app = build_app(settings, engine)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        proxy_headers=True,
        forwarded_allow_ips=settings.trusted_proxies,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
        log_level="info",
        access_log=args.access_log,
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else EXIT_PROBLEM


def cmd_migrate(args: argparse.Namespace) -> int:
    settings, problems = _settings(args.env_file)
    if settings is None:
        return _fail(problems)
    from sqlalchemy.exc import SQLAlchemyError

    from app.db import describe_db_error, migrate

    try:
        before, after = migrate(settings.database_url)
    except SQLAlchemyError as error:
        return _fail(describe_db_error(error))
    print(
        f"database schema: {before or 'empty'} -> {after}"
        if before != after
        else f"database schema at {after}"
    )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    settings, problems = _settings(args.env_file)
    if settings is not None:
        from app.startup import database_problems, port_problem

        problems = settings.serving_problems() + database_problems(settings)
        if args.port is not None and (port := port_problem(args.host, args.port)):
            problems.append(port)
        if args.load_model and not problems:
            from app.startup import StartupError, load_engine

            try:
                load_engine(settings)
            except StartupError as error:
                problems.append(str(error))
    if problems:
        return _fail(problems)
    print("ok: configuration, database and model folder")
    return 0


def _read_password(args: argparse.Namespace) -> str | None:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    return args.password


def cmd_create_user(args: argparse.Namespace) -> int:
    settings, problems = _settings(args.env_file)
    if settings is None:
        return _fail(problems)
    from app.auth.accounts import AccountConflict, AccountError, create_user

    password = _read_password(args)
    if password is None:
        password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
    sessions = _session(settings)
    try:
        with sessions() as db, db.begin():
            user = create_user(db, email=args.email, password=password, role=args.role)
            print(f"created {user.role} {user.email} (id {user.id})", file=sys.stderr)
    except AccountConflict as error:
        if args.exist_ok:
            print(f"zeus: {error}; left unchanged", file=sys.stderr)
            return 0
        return _fail(f"{error} (use reset-password to change its password)", EXIT_EXISTS)
    except AccountError as error:
        return _fail(str(error))
    return 0


def cmd_create_api_key(args: argparse.Namespace) -> int:
    settings, problems = _settings(args.env_file)
    if settings is None:
        return _fail(problems)
    from app.auth.accounts import AccountError, create_api_key, find_user

    sessions = _session(settings)
    with sessions() as db, db.begin():
        user = find_user(db, args.email)
        if user is None:
            return _fail(f"no user with email {args.email.strip().lower()}")
        try:
            created = create_api_key(db, user=user, name=args.name, actor=None)
        except AccountError as error:
            return _fail(str(error))
    print(created.secret)
    return 0


def cmd_reset_password(args: argparse.Namespace) -> int:
    settings, problems = _settings(args.env_file)
    if settings is None:
        return _fail(problems)
    from app.auth.accounts import AccountError, find_user, set_password

    password = _read_password(args)
    sessions = _session(settings)
    with sessions() as db, db.begin():
        user = find_user(db, args.email)
        if user is None:
            return _fail(f"no user with email {args.email.strip().lower()}")
        try:
            new_password = set_password(db, user=user, password=password, actor=None)
        except AccountError as error:
            return _fail(str(error))
    if password is None:
        print(new_password)
    else:
        print(f"password of {user.email} changed", file=sys.stderr)
    return 0


def _database_errors_are_one_line(function):
    def wrapper(args: argparse.Namespace) -> int:
        from sqlalchemy.exc import SQLAlchemyError

        from app.db import describe_db_error

        try:
            return function(args)
        except SQLAlchemyError as error:
            return _fail(describe_db_error(error))

    return wrapper


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="python -m app", description=__doc__.splitlines()[0])
    main.add_argument("--env-file", type=Path, help="read ZEUS_* settings from this file too")
    commands = main.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the development server (production uses gunicorn)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(handler=cmd_serve)

    migrate = commands.add_parser("migrate", help="upgrade the database schema (safe to run concurrently)")
    migrate.set_defaults(handler=cmd_migrate)

    check = commands.add_parser("check", help="check configuration, database and model folder; serve nothing")
    check.add_argument("--host", default="127.0.0.1")
    check.add_argument("--port", type=int, help="also check that this port is free")
    check.add_argument(
        "--load-model", action="store_true", help="also load the model (catches out of memory)"
    )
    check.set_defaults(handler=cmd_check)

    def password_options(command: argparse.ArgumentParser, generated: bool) -> None:
        group = command.add_mutually_exclusive_group()
        group.add_argument("--password", help="the password (visible in ps: prefer --password-stdin)")
        group.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        if generated:
            command.epilog = "Without --password or --password-stdin, a password is generated and printed."

    create_user = commands.add_parser("create-user", help="add an admin or analyst account")
    create_user.add_argument("--email", required=True)
    create_user.add_argument("--role", required=True, choices=["admin", "analyst"])
    create_user.add_argument("--exist-ok", action="store_true", help="exit 0 when the email already exists")
    password_options(create_user, generated=False)
    create_user.set_defaults(handler=cmd_create_user)

    api_key = commands.add_parser("create-api-key", help="print a new API key of a user (shown this once)")
    api_key.add_argument("--email", required=True)
    api_key.add_argument("--name", default="cli")
    api_key.set_defaults(handler=cmd_create_api_key)

    reset = commands.add_parser(
        "reset-password", help="set or generate a user's password; ends their sessions"
    )
    reset.add_argument("--email", required=True)
    password_options(reset, generated=True)
    reset.set_defaults(handler=cmd_reset_password)
    return main


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return _database_errors_are_one_line(args.handler)(args)


if __name__ == "__main__":
    sys.exit(main())
