"""The ``receipts`` command line."""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import click

from worker.config import Settings, get_settings, unknown_variables_warning
from worker.errors import SettingsError
from worker.problems import EXIT_NO, Problem, explain

if TYPE_CHECKING:
    from rich.progress import TaskID

    from worker.api import NumberedRows, Progress


# Commands whose processes log: with RECEIPTS_LOG_FORMAT=json, what they print on stderr
# themselves (a check at start, a warning, the error that stops them) is a JSON line too, so
# that whatever ships their logs reads one JSON object per line.
LOGGING_COMMANDS = ("run", "worker", "beat", "exporter", "receiver")
JSON_LINES = "receipts.json_lines"


def _say(line: str, level: int = logging.INFO) -> None:
    """A line of this command on stderr: as it is, or in a JSON log stream as a JSON object
    (without the ``error:``/``warning:`` prefix, which its level says)."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.find_root().meta.get(JSON_LINES):
        from worker.logs import json_line

        for prefix in ("error: ", "warning: "):
            line = line.removeprefix(prefix)
        click.echo(json_line(line, level=level), err=True)
    else:
        click.echo(line, err=True)


def _fail(message: str, code: int = 2) -> NoReturn:
    _say(f"error: {message}", logging.ERROR)
    sys.exit(code)


def _cannot_listen(host: str, port: int, exc: OSError, command: str) -> NoReturn:
    """One line for a server command whose address is taken or not ours, never a traceback."""
    if exc.errno == errno.EADDRINUSE:
        reason = f"address already in use (another receipts {command}?)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        reason = "this machine has no such address"
    elif exc.errno == errno.EACCES:
        reason = "permission denied (ports below 1024 need privileges)"
    else:
        reason = exc.strerror or str(exc)
    shown = f"[{host}]" if ":" in host else host
    _fail(f"cannot listen on {shown}:{port}: {reason}")


def _settings() -> Settings:
    try:
        return get_settings()
    except SettingsError as exc:
        _fail(str(exc))


DEBUG = "receipts.debug"


def _debugging(ctx: click.Context) -> bool:
    """--debug, or RECEIPTS_DEBUG when the failure came before the options were read."""
    if ctx.meta.get(DEBUG):
        return True
    value = os.environ.get("RECEIPTS_DEBUG", "").strip().lower()
    return value in ("1", "true", "yes", "on")


class _Commands(click.Group):
    """The ``receipts`` group: any error a command does not handle itself becomes one line
    (worker/problems.py) and an exit code that means something (README "Exit codes");
    ``--debug`` lets the traceback through instead."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if _debugging(ctx):
                raise
            _fail_with(exc)


def _problem(exc: BaseException) -> Problem:
    """``exc`` in one line (worker/problems.py), naming the configured servers."""
    try:
        settings: Settings | None = get_settings()
    except SettingsError:
        settings = None
    return explain(
        exc,
        database_url=settings.database_url if settings else None,
        broker_url=settings.broker_url if settings else None,
    )


def _fail_with(exc: BaseException) -> NoReturn:
    problem = _problem(exc)
    _fail(problem.line, code=problem.exit_code)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="uspeedo-receipts", prog_name="receipts")
@click.option(
    "--debug",
    is_flag=True,
    envvar="RECEIPTS_DEBUG",
    help="Show an error's traceback instead of its one line [env: RECEIPTS_DEBUG].",
)
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Track Uspeedo SMS sessions and poll their delivery receipts into SQL.

    Exit codes: 0 done; 1 done, and the answer is no (not found, refused, some of it failed,
    an alert); 2 usage, settings, or a setup to fix (run receipts migrate, create the
    database, a permission); 3 a server did not answer, try again later; 70 unexpected
    (--debug shows the traceback).
    """
    ctx.meta[DEBUG] = debug
    ctx.meta[JSON_LINES] = (
        ctx.invoked_subcommand in LOGGING_COMMANDS
        and os.environ.get("RECEIPTS_LOG_FORMAT", "").strip().lower() == "json"
    )
    warning = unknown_variables_warning(os.environ)
    if warning:
        _say(warning, logging.WARNING)


@main.command()
def migrate() -> None:
    """Bring the database to the newest schema (Alembic upgrade head)."""
    from worker.migrate import upgrade

    settings = _settings()
    upgrade(settings.database_url)
    click.echo("database is at the newest schema")


# --- track ------------------------------------------------------------------------------

CSV_COLUMNS = ("account_id", "session_no", "phones", "sent_at")


def _csv_rows(handle: TextIO) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows with their line numbers as a spreadsheet shows them (header = line 1); blank
    lines, which the reader skips, still count."""
    reader = csv.DictReader(handle)
    header = reader.fieldnames or []
    missing = [c for c in ("account_id", "session_no") if c not in header]
    if missing:
        raise click.UsageError(
            f"CSV header must name the columns {', '.join(CSV_COLUMNS)}; "
            f"missing {', '.join(missing)}"
        )
    unknown = [c for c in header if c not in (*CSV_COLUMNS, "user_ref")]
    if unknown:
        raise click.UsageError(f"CSV has unknown column(s) {', '.join(unknown)}")
    for row in reader:
        # DictReader files surplus fields under the key None; keep them so that the row is
        # refused as having an unknown field instead of being silently truncated.
        extra = row.pop(None, None)
        cleaned: dict[str, Any] = {k: (v if v is not None else "") for k, v in row.items()}
        if extra:
            cleaned["extra_fields"] = extra
        yield reader.line_num, cleaned


def _rewindable(handle: TextIO) -> TextIO:
    """``handle`` if it can be read again from its start, else a temporary copy of it (stdin
    from a pipe): the rows are read twice, validated and then recorded, never kept."""
    if handle.seekable():
        return handle
    spool = tempfile.TemporaryFile("w+", encoding="utf-8", newline="")  # noqa: SIM115 - lives as long as the command
    shutil.copyfileobj(handle, spool)
    return spool


def _csv_source(handle: TextIO) -> NumberedRows:
    """The CSV's rows, with their line numbers, read from its start at each call."""
    rewindable = _rewindable(handle)

    def rows() -> Iterator[tuple[int, dict[str, Any]]]:
        rewindable.seek(0)
        return _csv_rows(rewindable)

    return rows


def _session_no_source(session_nos: tuple[str, ...], fields: dict[str, Any]) -> NumberedRows:
    """One row per SESSION_NO argument, numbered; ``-`` stands for stdin's non-empty lines."""
    stdin = _rewindable(sys.stdin) if "-" in session_nos else None

    def values() -> Iterator[str]:
        read_stdin = stdin is not None
        for arg in session_nos:
            if arg != "-":
                yield arg
            elif read_stdin and stdin is not None:
                read_stdin = False  # stdin holds its lines once, as it would without a copy
                stdin.seek(0)
                yield from (line.strip() for line in stdin if line.strip())

    def rows() -> Iterator[tuple[int, dict[str, Any]]]:
        for number, value in enumerate(values(), start=1):
            yield number, {**fields, "session_no": value}

    return rows


# An import shows its progress from this many rows on: a smaller one is done before a bar
# would tell anything (100,000 rows took 16 s without a word).
PROGRESS_FROM = 5_000


@contextmanager
def _import_progress() -> Iterator[Progress | None]:
    """A progress bar for a big import on stderr when it is a terminal (never in a pipe or a
    log: there it would be noise), shown once the rows reach :data:`PROGRESS_FROM` and gone
    when the import ends; None (no bar) elsewhere."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    tasks: dict[str, TaskID] = {}

    def update(phase: str, done: int, total: int | None) -> None:
        if phase not in tasks:
            if done < PROGRESS_FROM and (total is None or total < PROGRESS_FROM):
                return
            if not tasks:
                bar.start()
            tasks[phase] = bar.add_task(f"{phase} rows", total=total)
        bar.update(tasks[phase], completed=done, total=total)

    try:
        yield update
    finally:
        bar.stop()


@main.command()
@click.option("--account-id", type=str, help="Uspeedo AccountId (project id) of the sessions.")
@click.option("--phones", help="Comma-separated phones the session was sent to.")
@click.option("--sent-at", help="When the session was sent, ISO 8601 with offset (default: now).")
@click.option("--user-ref", help="Your own reference, stored with the session.")
@click.option(
    "--csv",
    "csv_file",
    type=click.File("r", encoding="utf-8-sig"),
    help="CSV with header account_id,session_no,phones,sent_at ('-' reads it from stdin).",
)
@click.argument("session_nos", nargs=-1)
def track(
    account_id: str | None,
    phones: str | None,
    sent_at: str | None,
    user_ref: str | None,
    csv_file: TextIO | None,
    session_nos: tuple[str, ...],
) -> None:
    """Record sessions to poll. SESSION_NO '-' reads one SessionNo per line from stdin.

    Every row is validated first: if any is invalid, nothing is recorded and the error names
    each bad row and field. Then the rows are recorded in chunks, each its own transaction, so
    that a big import never holds up the worker. If the database fails part way, the chunks
    recorded stay recorded; running the same command again completes the import.
    """
    from worker.api import track_stream
    from worker.errors import TrackError, TrackInterrupted

    _settings()
    if csv_file is not None:
        if session_nos:
            raise click.UsageError("give SESSION_NO arguments or --csv, not both")
        given = [
            option
            for option, value in (
                ("--account-id", account_id),
                ("--phones", phones),
                ("--sent-at", sent_at),
                ("--user-ref", user_ref),
            )
            if value is not None
        ]
        if given:
            # The CSV's own columns say these for each row; an option beside it was ignored.
            raise click.UsageError(
                f"--csv takes every field from the file: drop {', '.join(given)}"
            )
        rows, label = _csv_source(csv_file), "CSV line"
    else:
        if account_id is None:
            raise click.UsageError("--account-id is required (or use --csv)")
        fields = {
            "account_id": account_id,
            "phones": phones,
            "sent_at": sent_at,
            "user_ref": user_ref,
        }
        rows, label = _session_no_source(session_nos, fields), "SESSION_NO"
        if next(iter(rows()), None) is None:
            raise click.UsageError("no SESSION_NO given")
    try:
        with _import_progress() as progress:
            result = track_stream(rows, label=label, progress=progress)
    except TrackError as exc:
        _fail(str(exc))
    except TrackInterrupted as exc:
        if exc.recorded == 0 and exc.__cause__ is not None:
            # Nothing recorded: the setup's problem alone says what to do (run receipts
            # migrate, create the database), without the words about a partial import.
            _fail_with(exc.__cause__)
        _fail(str(exc), code=_problem(exc.__cause__).exit_code if exc.__cause__ else EXIT_NO)
    click.echo(
        f"tracked {result.total} session(s): {result.inserted} new, "
        f"{result.updated} merged, {result.unchanged} unchanged"
    )


# --- running ----------------------------------------------------------------------------


def _require_api(settings: Settings) -> None:
    problem = settings.missing_api_credentials()
    if problem:
        _fail(problem)


def _check_at_start(settings: Settings) -> None:
    """The check of `receipts check` before a worker starts: every poll would be refused
    with credentials or a clock the API refuses, so the worker does not start; an API that
    cannot be reached now may answer later (polls retry), so the worker starts anyway."""
    from worker.check import START_CHECK_WITHIN, check_api

    result = check_api(settings, within=START_CHECK_WITHIN)
    if result.refuses_start:
        _fail(f"not starting: {result.line}", code=result.exit_code)
    if result.exit_code:
        _say(
            f"warning: could not check the credentials, starting anyway: {result.line}",
            logging.WARNING,
        )
    else:
        _say(result.line)


def _check_schema() -> None:
    """A worker needs the newest schema (``receipts run`` migrates, ``receipts worker`` does
    not): without it every tick and poll would fail, each with a traceback in the log."""
    from worker.migrate import schema_problem

    problem = schema_problem()
    if problem:
        _fail(f"not starting: {problem}")


def _check_broker(settings: Settings) -> None:
    """One look at the broker before a worker or beat starts. Unreachable: one line, and the
    start goes on (Celery keeps trying, and a broker started alongside comes up later); a
    transport or package that does not exist: the start stops with its one line."""
    from worker.problems import EXIT_UNAVAILABLE, check_broker

    problem = check_broker(settings.broker_url)
    if problem is None:
        return
    if problem.exit_code != EXIT_UNAVAILABLE:
        _fail(problem.line, code=problem.exit_code)
    _say(f"warning: {problem.line}; starting anyway, Celery keeps trying", logging.WARNING)


def _celery_quiet(settings: Settings) -> list[str]:
    """Celery's ``--quiet`` in a JSON log stream: its start banner is text for people."""
    return ["--quiet"] if settings.log_format == "json" else []


def _queues() -> str:
    from worker.celery import QUEUES

    return ",".join(QUEUES)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option(
    "--demo",
    is_flag=True,
    help="Watch it work with nothing configured: against a fake Uspeedo, with timings in "
    "seconds, in a folder of its own (receipts-demo/), never your database or settings.",
)
@click.pass_context
def run(ctx: click.Context, loglevel: str, demo: bool) -> None:
    """The main job in one command: a worker with embedded beat.

    Checks the credentials first as `receipts check` does (refuses to start when the API
    refuses them or this host's clock), then creates or migrates the database. Extra options
    go to `celery worker`.
    """
    from worker.migrate import upgrade

    if demo:
        from worker.demo import run_demo

        sys.exit(run_demo(loglevel=loglevel, celery_args=ctx.args))
    settings = _settings()
    if settings.missing_api_credentials():
        missing = [
            name
            for name, value in (
                ("RECEIPTS_ACCESS_KEY_ID", settings.access_key_id),
                ("RECEIPTS_ACCESS_KEY_SECRET", settings.access_key_secret),
            )
            if not value
        ]
        _fail(
            f"set {' and '.join(missing)} (your Uspeedo API key) to poll {settings.api_url}\n"
            "or watch it work first, with nothing set: receipts run --demo"
        )
    _check_at_start(settings)
    _check_broker(settings)
    upgrade(settings.database_url)
    from worker.celery import app

    app.worker_main(
        [
            *_celery_quiet(settings),
            "worker",
            "--beat",
            "--loglevel",
            loglevel,
            "--queues",
            _queues(),
            *ctx.args,
        ]
    )


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.pass_context
def worker(ctx: click.Context, loglevel: str) -> None:
    """A worker (run any number). Extra options go to `celery worker`.

    Checks the credentials first as `receipts check` does, and refuses to start when the API
    refuses them or this host's clock.
    """
    settings = _settings()
    _require_api(settings)
    _check_at_start(settings)
    _check_schema()
    _check_broker(settings)
    from worker.celery import app

    app.worker_main(
        [
            *_celery_quiet(settings),
            "worker",
            "--loglevel",
            loglevel,
            "--queues",
            _queues(),
            *ctx.args,
        ]
    )


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.pass_context
def beat(ctx: click.Context, loglevel: str) -> None:
    """The clock (run exactly one; a second one is harmless but useless)."""
    settings = _settings()
    _check_broker(settings)
    from worker.celery import app

    app.start([*_celery_quiet(settings), "beat", "--loglevel", loglevel, *ctx.args])


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8700, show_default=True, type=click.IntRange(0, 65535))
@click.option("--access-key-id", default="demo", show_default=True)
@click.option("--access-key-secret", default="demo-secret", show_default=True)
@click.option(
    "--step",
    default=2.0,
    show_default=True,
    type=click.FloatRange(min=0.01),
    help="Seconds per step of the scenarios' timelines.",
)
@click.option("--seed", type=int, help="Seed for reproducible random behaviour.")
@click.option(
    "--push-url",
    help="Push every receipt report here as Uspeedo's Callback API does "
    "(e.g. http://127.0.0.1:8720/uspeedo/callback/TOKEN).",
)
@click.option(
    "--push-loss",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of reports lost before they are pushed.",
)
@click.option(
    "--push-batch",
    default=100,
    show_default=True,
    type=click.IntRange(1, 10_000),
    help="Reports per push, at most.",
)
def simulate(
    host: str,
    port: int,
    access_key_id: str,
    access_key_secret: str,
    step: float,
    seed: int | None,
    push_url: str | None,
    push_loss: float,
    push_batch: int,
) -> None:
    """Serve the project's own fake Uspeedo API (for demos and tests)."""
    from worker.simulator import serve

    if push_url is not None and not push_url.startswith(("http://", "https://")):
        raise click.BadParameter("give an http:// or https:// URL", param_hint="--push-url")
    try:
        serve(
            host,
            port,
            access_key_id=access_key_id,
            access_key_secret=access_key_secret,
            step=step,
            seed=seed,
            push_url=push_url,
            push_loss=push_loss,
            push_batch=push_batch,
        )
    except OSError as exc:  # the port is taken, or the address is not ours
        _cannot_listen(host, port, exc, "simulate")


@main.command("wait-for")
@click.argument("address")
@click.option(
    "--timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds to wait before giving up (exit 1).",
)
def wait_for(address: str, timeout: float) -> None:
    """Wait until a server listens on ADDRESS (HOST:PORT or a URL).

    For scripts that start a server in the background and must not talk to it too early,
    such as the README's Demo with `receipts simulate &`.
    """
    import socket
    import time
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(address if "://" in address else f"//{address}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or port is None:
        raise click.BadParameter("give HOST:PORT or a URL with a port", param_hint="ADDRESS")
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                break
        except OSError:
            if time.monotonic() >= deadline:
                _fail(f"nothing listens on {shown} after {timeout:g} s", code=EXIT_NO)
            time.sleep(0.1)
    click.echo(f"{shown} is listening")


@main.command()
@click.option(
    "--account-id",
    type=click.IntRange(min=1),
    help="AccountId (project id) to ask under [default: RECEIPTS_CHECK_ACCOUNT_ID, else 1].",
)
def check(account_id: int | None) -> None:
    """One harmless signed call: credentials, clock skew and reachability in one line.

    Exit codes: 0 accepted; 1 the API said no (credentials, clock, parameters, not the API);
    2 usage or settings; 3 unreachable or failing for now (DNS, connection, TLS, timeout,
    HTTP 429/5xx).
    """
    from worker.check import check_api

    settings = _settings()
    _require_api(settings)
    result = check_api(settings, account_id=account_id)
    if result.exit_code:
        _fail(result.line, code=result.exit_code)
    click.echo(result.line)


# --- inspecting -------------------------------------------------------------------------


def _iso(value: datetime | None) -> str:
    return value.astimezone(UTC).isoformat(timespec="seconds") if value else ""


@main.command()
@click.argument("session_no")
@click.option("--account-id", type=int, help="Needed only when accounts share a SessionNo.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def status(session_no: str, account_id: int | None, as_json: bool) -> None:
    """A session's state and every phone's receipt."""
    from worker import reports
    from worker.errors import SessionNotFound

    _settings()
    try:
        found = reports.session_status(session_no, account_id=account_id)
    except SessionNotFound as exc:
        _fail(str(exc), code=EXIT_NO)
    if as_json:
        click.echo(json.dumps(found, default=_json_default, indent=2))
        return
    reports.print_status(found)


@main.command()
@click.argument("session_no")
@click.option("--account-id", type=int, help="Needed only when accounts share a SessionNo.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def history(session_no: str, account_id: int | None, as_json: bool) -> None:
    """Every observed change of a session's receipts, oldest first, with its resolutions and
    escalations; a receipt that lost to the stored one is marked not applied. Phones masked
    unless RECEIPTS_LOG_PHONES."""
    from worker import reports
    from worker.api import history as read_history
    from worker.errors import SessionNotFound

    settings = _settings()
    try:
        found = read_history(session_no, account_id=account_id)
    except SessionNotFound as exc:
        _fail(str(exc), code=1)
    shown = reports.history_rows(found, show_phones=settings.log_phones)
    if as_json:
        click.echo(json.dumps(shown, default=_json_default, indent=2))
        return
    reports.print_history(shown)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (what support needs).")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV, one row per phone.")
@click.option("--fail", is_flag=True, help="Exit 1 when any escalation is unacknowledged.")
def stale(as_json: bool, as_csv: bool, fail: bool) -> None:
    """Escalated and overdue sessions."""
    from worker import reports

    if as_json and as_csv:
        raise click.UsageError("give --json or --csv, not both")
    _settings()
    rows = reports.stale_sessions()
    if as_json:
        click.echo(json.dumps(rows, default=_json_default, indent=2))
    elif as_csv:
        reports.write_stale_csv(rows, sys.stdout)
    else:
        reports.print_stale(rows)
    if fail and any(r["kind"] == "escalated" for r in rows):
        sys.exit(EXIT_NO)


@main.command()
@click.argument("session_nos", nargs=-1, required=True)
@click.option("--note", help="What was done (kept with the session).")
@click.option("--account-id", type=int, help="Needed only when accounts share a SessionNo.")
def ack(session_nos: tuple[str, ...], note: str | None, account_id: int | None) -> None:
    """Mark escalations as handled; they stop counting as alerts (all or none)."""
    from worker.api import acknowledge
    from worker.errors import AckError

    _settings()
    try:
        done = acknowledge(session_nos, note=note, account_id=account_id)
    except AckError as exc:
        _fail(str(exc), code=EXIT_NO)
    click.echo(f"acknowledged {len(done)} escalation(s)")


@main.command()
@click.argument("session_nos", nargs=-1, required=True)
@click.option("--account-id", type=int, help="Only sessions of this account.")
def repoll(session_nos: tuple[str, ...], account_id: int | None) -> None:
    """Poll escalated sessions once more now (after the cutoff, on purpose): late receipts are
    recorded and a session that now qualifies becomes resolved, keeping escalated_at."""
    from worker import poller, runtime

    settings = _settings()
    _require_api(settings)
    # In this process, not through the broker: an operator waits for the answer.
    report = poller.repoll_escalated(
        list(session_nos),
        account_id=account_id,
        batch_size=settings.batch_size,
        **runtime.poll_dependencies(settings),
    )
    if not report.polled:
        _fail("none of these sessions is escalated", code=EXIT_NO)
    line = (
        f"repolled {report.polled} escalated session(s) in {report.api_calls} call(s): "
        f"{report.resolved} resolved, {report.failed} failed"
    )
    click.echo(line)
    if report.failed:
        # A script (or cron) must see that some sessions got no answer: their last_error
        # says why (`receipts status`), and running it again tries them again.
        sys.exit(EXIT_NO)


# --- retention -------------------------------------------------------------------------


def _older_than(value: str | None, default: Any, name: str = "RECEIPTS_RETENTION") -> Any:
    """--older-than, else the setting ``name`` (``default``); one line when neither is
    usable."""
    from worker.config import MAX_RETENTION, parse_duration

    if value is None:
        if default is None:
            _fail(f"give --older-than (e.g. 90d) or set {name}")
        return default
    try:
        duration = parse_duration(value)
    except ValueError as exc:
        _fail(f"--older-than: {exc}")
    if duration > MAX_RETENTION:
        _fail(f"--older-than: {value!r} is longer than the maximum, {MAX_RETENTION.days}d")
    return duration


@main.command()
@click.option(
    "--older-than",
    metavar="DURATION",
    help="Purge finished sessions sent longer ago than this (e.g. 90d) [default: "
    "RECEIPTS_RETENTION].",
)
@click.option("--dry-run", is_flag=True, help="Count what would go, by state and month.")
def purge(older_than: str | None, dry_run: bool) -> None:
    """Delete finished sessions past retention with their receipts and history.

    Never a pending session, an unacknowledged escalation, or a session with an event or
    webhook not yet delivered. Runs in batches, each its own transaction: safe to interrupt
    and to run again.
    """
    from worker import purge as purging
    from worker import runtime
    from worker.db import read_scope, session_scope

    settings = _settings()
    duration = _older_than(older_than, settings.retention)
    now = runtime.utcnow()
    destinations = settings.event_destinations
    if dry_run:
        with read_scope() as session:
            lines = purging.dry_run(
                session, now=now, older_than=duration, destinations=destinations
            )
        for line in lines:
            click.echo(f"{line.state:<10} {line.month}  {line.sessions} session(s)")
        click.echo(f"total: {sum(line.sessions for line in lines)} session(s) would be purged")
        return
    report = purging.purge(session_scope, now=now, older_than=duration, destinations=destinations)
    click.echo(
        f"purged {report.sessions} session(s): {report.receipts} receipt(s), "
        f"{report.history} history row(s), {report.inbox} inbox row(s), "
        f"{report.outbox} webhook row(s)"
    )


@main.command()
@click.option(
    "--older-than",
    metavar="DURATION",
    help="Mask finished sessions sent longer ago than this (e.g. 30d) [default: "
    "RECEIPTS_MASK_PHONES_AFTER].",
)
@click.option("--dry-run", is_flag=True, help="Count what would be masked, by state and month.")
def mask(older_than: str | None, dry_run: bool) -> None:
    """Mask the phone numbers of finished sessions: IRREVERSIBLE.

    Keeps the last four digits in receipts, history, tracked phones and escalation detail;
    phone_key becomes a keyed hash (RECEIPTS_PHONE_HASH_KEY) so late receipts still match.
    Runs in batches, each its own transaction: safe to interrupt and to run again.
    """
    from worker import masking, runtime
    from worker.db import read_scope, session_scope

    settings = _settings()
    duration = _older_than(older_than, settings.mask_phones_after, "RECEIPTS_MASK_PHONES_AFTER")
    if duration <= settings.cutoff:
        _fail(
            f"--older-than: must be longer than RECEIPTS_CUTOFF "
            f"({settings.cutoff.total_seconds():g}s): a session "
            "is masked only once it is past its cutoff"
        )
    now = runtime.utcnow()
    if dry_run:
        with read_scope() as session:
            lines = masking.dry_run(session, now=now, older_than=duration)
        for line in lines:
            click.echo(f"{line.state:<10} {line.month}  {line.sessions} session(s)")
        click.echo(f"total: {sum(line.sessions for line in lines)} session(s) would be masked")
        return
    if settings.phone_hash_key is None:
        _fail(
            "set RECEIPTS_PHONE_HASH_KEY (e.g. the output of `openssl rand -hex 32`): masked "
            "sessions' phone_key is a hash under it, which late receipts need to match"
        )
    phone_hash = masking.PhoneHash.of(settings.phone_hash_key.get_secret_value())
    report = masking.mask(session_scope, now=now, older_than=duration, phone_hash=phone_hash)
    click.echo(
        f"masked {report.sessions} session(s): {report.receipts} receipt(s), "
        f"{report.history} history row(s), {report.outbox} webhook row(s)"
    )


# --- refused receipts.track tasks --------------------------------------------------------


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--all", "show_all", is_flag=True, help="Resubmitted and dismissed ones too.")
@click.pass_context
def rejected(ctx: click.Context, as_json: bool, show_all: bool) -> None:
    """receipts.track tasks refused by validation: list the open ones (phones masked unless
    RECEIPTS_LOG_PHONES), resubmit them once fixed, or dismiss them."""
    if ctx.invoked_subcommand is not None:
        if as_json or show_all:
            raise click.UsageError("--json and --all list rejected tracks: give no subcommand")
        return
    from worker import reports
    from worker.api import rejected_tracks

    settings = _settings()
    rows = reports.rejected_rows(
        rejected_tracks(include_closed=show_all), show_phones=settings.log_phones
    )
    if as_json:
        click.echo(json.dumps(rows, default=_json_default, indent=2))
    else:
        reports.print_rejected(rows, closed_too=show_all)


def _corrections(_ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> Any:
    from worker.intake import parse_corrections

    try:
        return parse_corrections(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _masked(text: str, settings: Settings) -> str:
    """An error text about stored arguments, phones masked as the listing shows them."""
    from worker.logs import scrub

    return text if settings.log_phones else scrub(text)


@rejected.command()
@click.argument("ids", nargs=-1, required=True, type=int)
@click.option(
    "--set",
    "corrections",
    multiple=True,
    metavar="FIELD=VALUE",
    callback=_corrections,
    help="Replace a field of the stored arguments (repeatable); FIELD= drops it.",
)
@click.option("--note", help="Kept with the rows.")
def resubmit(ids: tuple[int, ...], corrections: dict[str, str | None], note: str | None) -> None:
    """Track refused tasks again with corrections, and close them (all or none)."""
    from worker.api import resubmit_rejected
    from worker.errors import RejectedTrackError, TrackError

    settings = _settings()
    try:
        result = resubmit_rejected(ids, corrections=corrections, note=note)
    except (RejectedTrackError, TrackError) as exc:
        _fail(_masked(str(exc), settings), code=EXIT_NO)
    click.echo(
        f"resubmitted {len(set(ids))} rejected track(s): {result.inserted} new, "
        f"{result.updated} merged, {result.unchanged} unchanged"
    )


@rejected.command()
@click.argument("ids", nargs=-1, required=True, type=int)
@click.option("--note", help="Why (kept with the rows).")
def dismiss(ids: tuple[int, ...], note: str | None) -> None:
    """Close refused tasks without tracking them (all or none)."""
    from worker.api import dismiss_rejected
    from worker.errors import RejectedTrackError

    _settings()
    try:
        closed = dismiss_rejected(ids, note=note)
    except RejectedTrackError as exc:
        _fail(str(exc), code=EXIT_NO)
    click.echo(f"dismissed {len(closed)} rejected track(s)")


@main.group("events")
def events_group() -> None:
    """Event batches parked after failing for RECEIPTS_EVENTS_RETRY_WINDOW: list them, have
    them sent again, or let them go."""


@events_group.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--all", "show_all", is_flag=True, help="Replayed and dismissed ones too.")
def parked(as_json: bool, show_all: bool) -> None:
    """List the open parked batches (parked, or waiting to be replayed)."""
    import dataclasses

    from worker import reports
    from worker.api import parked_event_batches

    _settings()
    rows = [dataclasses.asdict(b) for b in parked_event_batches(include_closed=show_all)]
    if as_json:
        click.echo(json.dumps(rows, default=_json_default, indent=2))
    else:
        reports.print_parked(rows, closed_too=show_all)


@events_group.command()
@click.argument("ids", nargs=-1, required=True, type=int)
def replay(ids: tuple[int, ...]) -> None:
    """Send parked batches again: their destination's next delivery round (within a tick)
    sends them before the stream (all or none)."""
    from worker.api import replay_parked
    from worker.errors import ParkedBatchError

    _settings()
    try:
        marked = replay_parked(ids)
    except ParkedBatchError as exc:
        _fail(str(exc), code=EXIT_NO)
    click.echo(
        f"{len(marked)} parked batch(es) to be replayed by the next delivery round; "
        "`receipts events parked --all` shows when each is"
    )


@events_group.command("dismiss")
@click.argument("ids", nargs=-1, required=True, type=int)
def dismiss_parked_batches(ids: tuple[int, ...]) -> None:
    """Close parked batches without sending them (all or none)."""
    from worker.api import dismiss_parked
    from worker.errors import ParkedBatchError

    _settings()
    try:
        closed = dismiss_parked(ids)
    except ParkedBatchError as exc:
        _fail(str(exc), code=EXIT_NO)
    click.echo(f"dismissed {len(closed)} parked batch(es)")


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return _iso(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


@main.command()
@click.option(
    "--port",
    default=9464,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to listen on (0 picks a free one and prints it).",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. The metrics have no authentication, so the default keeps "
    "them on this machine; use 0.0.0.0 inside a container or behind a firewall or reverse "
    "proxy that lets only Prometheus in.",
)
def exporter(port: int, host: str) -> None:
    """Serve Prometheus metrics computed from the database at /metrics.

    Every scrape reads the work in progress, so one exporter reports for all workers; the
    totals that grow with history are recounted every RECEIPTS_EXPORTER_TOTALS_INTERVAL. A
    database error is reported as receipts_scrape_error 1, and the exporter keeps serving.
    """
    import logging

    from worker import logs
    from worker.metrics import serve

    settings = _settings()
    # Scrape errors are logged; without this only Python's last-resort handler would show them.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logs.setup(None, settings)
    try:
        serve(
            port,
            host,
            totals_interval=settings.exporter_totals_interval,
            announce=lambda url: click.echo(f"serving metrics on {url}"),
        )
    except OSError as exc:  # the port is taken, or the address is not ours
        _cannot_listen(host, port, exc, "exporter")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8720, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Server processes (each with its own database connections).",
)
def receiver(host: str, port: int, workers: int) -> None:
    """Receive Uspeedo's push of status reports at POST /uspeedo/callback/<token>.

    Needs RECEIPTS_CALLBACK_TOKEN (at least 24 characters); run it behind a reverse proxy that
    terminates TLS. GET /healthz answers 200 while the database does.
    """
    import logging
    import socket

    from worker.receiver import configure_logging, serve

    settings = _settings()
    problem = settings.receiver_problem()
    if problem:
        _fail(problem)
    # One line for a busy port, before uvicorn would log its own traceback.
    try:
        with socket.create_server((host, port), reuse_port=False):
            pass
    except OSError as exc:
        _cannot_listen(host, port, exc, "receiver")
    configure_logging(settings)
    logging.getLogger(__name__).info(
        "receiving Uspeedo's push on http://%s:%d/uspeedo/callback/<token> (%d process(es))",
        host,
        port,
        workers,
    )
    serve(host, port, workers=workers)


if __name__ == "__main__":  # pragma: no cover
    main()
