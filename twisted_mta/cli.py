"""
The operator's command line::

    twisted-mta config check|show FILE
    twisted-mta queue list|show|flush|hold|release|delete ... --config FILE
    twisted-mta user add|delete|list USERS-FILE ...
    twisted-mta tls explain DOMAIN|--message QUEUE-ID --config FILE [--json]
    twisted-mta tls publish --config FILE [--json]
    twisted-mta tls report show [DOMAIN] [--day YYYY-MM-DD] --config FILE [--json]
    twisted-mta tls report send --now [DOMAIN] --config FILE
    twisted-mta tls inbox --config FILE [--since 7d] [--mailbox USER|PATH] [--json]
    twisted-mta sendmail [sendmail's flags] [RECIPIENT ...]   (twisted_mta.sendmail)

Exit status 0 on success, 1 when the configuration is bad or an entry is
not found (the reason on stderr, one line), 2 on usage errors.  The queue
commands that change something ask the running MTA (see
L{twisted_mta.queue.control}); list and show only read.
(tls inbox has its own: 0 nothing to fix, 1 failures reported, 2 cannot read.)
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys
import time
from typing import Any

import attrs

from twisted_mta.config import ConfigError, load_config
from twisted_mta.queue import control
from twisted_mta.model import Envelope
from twisted_mta.queue.spool import Spool, SpoolError
from twisted_mta.outbound.router import ascii_domain
from twisted_mta.users import UsersFileError, read_users_file, write_user


def _flatten(prefix: str, value: Any, out: list[str]) -> None:
    if isinstance(value, dict) and prefix != "local.aliases" or prefix == "":
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    elif prefix == "listeners":
        for i, item in enumerate(value):
            for k, v in item.items():
                out.append(f"listeners[{i}].{k} = {json.dumps(v)}")
    else:
        out.append(f"{prefix} = {json.dumps(value)}")


def cmd_config_check(args: argparse.Namespace) -> int:
    """
    Build what C{twistd mta} builds (L{tap.prepare}), without starting
    anything; warn about TLS entries that require TLS but can still fall
    back to cleartext.
    """
    from twisted_mta import tap
    try:
        config = load_config(args.file)
        prepared = tap.prepare(config)
    except (ConfigError, tap.PrepareError) as e:
        print(f"twisted-mta: {e}", file=sys.stderr)
        return 1
    for entry in prepared.tls_entries:
        warning = entry.warning()
        if warning:
            print(warning, file=sys.stderr)
    print(f"{args.file}: ok ({len(config.listeners)} listener(s), "
          f"{len(config.local.domains)} local domain(s))")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    """
    Print the effective configuration, defaults filled in (like C{postconf}),
    then the fallback decider of every TLS policy entry.  With C{-n}, only
    the keys whose value differs from the default (like C{postconf -n}):
    the defaults are what the same file gives with every optional key left
    out; the required keys (C{server.hostname}, C{server.spool}, the
    listeners) have no default and are always printed.
    """
    import tomllib

    from twisted_mta import tap
    from twisted_mta.config import parse_config
    try:
        config = load_config(args.file)
        _, entries = tap.prepare_tls(config)
        if args.non_default:
            with open(args.file, "rb") as f:
                server = tomllib.load(f)["server"]
            defaults = parse_config({
                "server": {"hostname": server["hostname"], "spool": server["spool"]},
                "listeners": [{"role": "mx", "endpoint": "tcp:25"}],
            }, args.file)
    except (ConfigError, tap.PrepareError) as e:
        print(f"twisted-mta: {e}", file=sys.stderr)
        return 1
    data = config.to_dict()
    if args.non_default:
        def pairs(d: dict[str, Any]) -> dict[str, str]:
            lines: list[str] = []
            _flatten("", d, lines)
            return dict(line.split(" = ", 1) for line in lines)
        default = pairs(defaults.to_dict())
        changed = {k: v for k, v in pairs(data).items()
                   if k in ("server.hostname", "server.spool") or k.startswith("listeners[")
                   or default.get(k) != v}
        if args.json:
            print(json.dumps({k: json.loads(v) for k, v in changed.items()}, indent=2))
        else:
            print("\n".join(f"{k} = {v}" for k, v in changed.items()))
    elif args.json:
        data["effective_tls"] = [e.to_dict() for e in entries]
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        lines: list[str] = []
        _flatten("", data, lines)
        lines.append("")
        lines.append("# the fallback decider each TLS policy entry uses")
        lines.extend(e.describe() for e in entries)
        print("\n".join(lines))
    return 0


def _duration(seconds: float) -> str:
    seconds = int(abs(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            rest = seconds % size
            sub = {"d": 3600, "h": 60, "m": 1}[unit]
            small = {"d": "h", "h": "m", "m": "s"}[unit]
            return f"{seconds // size}{unit}{rest // sub}{small}" if rest // sub else f"{seconds // size}{unit}"
    return f"{seconds}s"


def _entry_json(qid: str, state: str, env: Envelope | None, problem: str | None,
                now: float) -> dict[str, Any]:
    if env is None:
        return {"queue_id": qid, "state": state, "problem": problem}
    out = env.to_dict()
    out.pop("version")
    out["state"] = state
    out["age_seconds"] = round(now - env.arrival, 3)
    if problem:
        out["problem"] = problem
    return out


def _config(args: argparse.Namespace):
    """
    The configuration named by C{--config}, or None after saying why.
    """
    try:
        # mailq (sendmail -bp) lists the queue without opening the keys.
        return load_config(args.config, getattr(args, "check_files", True))
    except ConfigError as e:
        print(f"twisted-mta: {e}", file=sys.stderr)
        return None


def _not_yet(config) -> str | None:
    """
    Words for a spool that does not exist yet (the MTA never ran: an
    empty queue), or None.  Read-only commands must not create it.
    """
    if os.path.isdir(config.spool):
        return None
    return f"the spool {config.spool} does not exist yet"


def _spool_error(spool: Spool, e: OSError) -> None:
    where = f" ({e.filename})" if e.filename else ""
    print(f"twisted-mta: cannot read the spool {spool.path}: {e.strerror or e}{where}",
          file=sys.stderr)


def _find(spool: Spool, queue_id: str):
    """
    One entry as L{Spool.find} gives it: C{(found, entry or None)}, where
    C{found} is False after saying why the spool cannot be read.
    """
    try:
        return True, spool.find(queue_id)
    except OSError as e:
        _spool_error(spool, e)
        return False, None


# Rows whose widths set the columns of `queue list`: the rest are printed
# as they are read (a longer cell shifts its row), so memory stays flat.
WIDTH_ROWS = 1000


def _list_row(qid: str, state: str, env: Envelope | None, problem: str | None,
              now: float) -> tuple[str, ...]:
    if env is None:
        return (qid, state, "?", "?", "?", "-", f"unreadable: {problem}")
    pending = len(env.pending())
    rcpts = f"{len(env.recipients)} ({pending} pending)" if pending != len(env.recipients) \
        else str(len(env.recipients))
    if state == "hold":
        nxt = "held"
    elif env.next_attempt <= now:
        nxt = "due now"
    else:
        nxt = "in " + _duration(env.next_attempt - now)
    last = env.last_outcome
    return (qid, state, _duration(now - env.arrival), f"<{env.sender}>", rcpts, nxt,
            str(last) if last else "-")


def _print_json_array(items) -> None:
    """
    A JSON array of C{items}, written one at a time: one item a line, its
    keys sorted.  Not indented: json's C encoder does not indent, and with
    it 100,000 entries list in about 7 s instead of 12 (docs/benchmarks.md).
    """
    out = sys.stdout
    first = True
    for item in items:
        out.write("[\n" if first else ",\n")
        first = False
        out.write(json.dumps(item, sort_keys=True))
    out.write("[]\n" if first else "\n]\n")


def cmd_queue_list(args: argparse.Namespace) -> int:
    """
    Entries are read, formatted and printed one at a time (L{Spool.iter_scan}),
    so a queue of 100,000 lists in the memory of a few.
    """
    config = _config(args)
    if config is None:
        return 1
    missing = _not_yet(config)
    if missing:
        print("[]" if args.json else f"The queue is empty ({missing}).")
        return 0
    now = time.time()
    spool = Spool(config.spool)
    entries = spool.iter_scan()
    try:
        if args.json:
            _print_json_array(_entry_json(*e, now) for e in entries)
            return 0
        header = ("QUEUE ID", "STATE", "AGE", "SENDER", "RECIPIENTS", "NEXT ATTEMPT",
                  "LAST ERROR")
        rows = [header] + [_list_row(*e, now) for e in itertools.islice(entries, WIDTH_ROWS)]
        if len(rows) == 1:
            print("The queue is empty.")
            return 0
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        total = -1  # the header is no entry
        for r in itertools.chain(rows, (_list_row(*e, now) for e in entries)):
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[6])
            total += 1
    except OSError as e:
        _spool_error(spool, e)
        return 1
    print(f"\n{total} entr{'y' if total == 1 else 'ies'}")
    return 0


def _bad_queue_id(queue_id: str) -> bool:
    """
    Whether C{queue_id} is not a queue id, after saying so in one line:
    nothing is looked up, requested or deleted for it.
    """
    try:
        control.check_queue_id(queue_id)
    except control.ControlError as e:
        print(f"twisted-mta: {e}", file=sys.stderr)
        return True
    return False


def cmd_queue_show(args: argparse.Namespace) -> int:
    if _bad_queue_id(args.queue_id):
        return 2
    config = _config(args)
    if config is None:
        return 1
    missing = _not_yet(config)
    if missing:
        print(f"twisted-mta: no queue entry {args.queue_id}: {missing}, so the queue is empty",
              file=sys.stderr)
        return 1
    now = time.time()
    readable, found = _find(Spool(config.spool), args.queue_id)
    if not readable:
        return 1
    if found is not None:
        qid, state, env, problem = found
        if args.json:
            print(json.dumps(_entry_json(qid, state, env, problem, now), indent=2,
                             sort_keys=True))
            return 0
        if env is None:
            print(f"{qid}: in {state}/, envelope unreadable: {problem}")
            return 0
        print(f"Queue ID:      {qid} ({state}/)")
        print(f"Sender:        <{env.sender}>")
        print(f"Arrived:       {time.strftime('%Y-%m-%d %H:%M:%S %z', time.localtime(env.arrival))}"
              f" ({_duration(now - env.arrival)} ago)")
        client = env.client
        if client.get("protocol") == "sendmail":  # a drop of the sendmail command
            print(f"From:          uid {client.get('uid', '?')} ({client.get('user', '?')}) "
                  "via the sendmail command")
        elif client:
            print(f"From:          {client.get('helo', '')} [{client.get('ip', '')}] via "
                  f"{client.get('protocol', '')}" + (f", {client['tls']}" if client.get("tls") else ""))
        print(f"Size:          {env.size} octets")
        if env.requiretls or env.tls_required_no:
            print("TLS:           " + (
                "REQUIRETLS (verified TLS on every hop, RFC 8689)" if env.requiretls else
                "TLS-Required: No (the recipient's DANE and MTA-STS are not enforced)"))
        if env.smtputf8:
            print("SMTPUTF8:      yes (UTF-8 addresses or header fields, RFC 6531)")
        print(f"Attempts:      {env.attempts}")
        if state == "hold":
            print("Next attempt:  none (held)")
        else:
            print(f"Next attempt:  {time.strftime('%Y-%m-%d %H:%M:%S %z', time.localtime(env.next_attempt))}")
        print("Recipients:")
        for r in env.recipients:
            via = f" (for <{r.original}>)" if r.original else ""
            outcome = f": {r.outcome}" if r.outcome else ""
            owed = " (its DSN is not queued yet: retried)" if r.dsn_pending else ""
            print(f"  {r.state:9s} <{r.address}>{via}{owed}{outcome}")
        if problem:
            print(f"Note: {problem}")
        return 0
    print(f"twisted-mta: no queue entry {args.queue_id}", file=sys.stderr)
    return 1


def cmd_queue_action(args: argparse.Namespace) -> int:
    qid = getattr(args, "queue_id", None)
    qid = control.ALL if qid is None else qid  # only flush may name none
    if qid != control.ALL and _bad_queue_id(qid):
        return 2
    config = _config(args)
    if config is None:
        return 1
    override = ("cleartext" if getattr(args, "allow_cleartext", False)
                else getattr(args, "tls", None))
    action = args.action
    if override:
        if qid == control.ALL:
            print("twisted-mta: a TLS override is for one message: name its queue id",
                  file=sys.stderr)
            return 2
        action = f"{args.action}:{override}"
    missing = _not_yet(config)
    if missing:
        # Nothing to act on, and no spool to make for a queue that is empty.
        if qid == control.ALL:
            print(f"The queue is empty ({missing}): nothing to {args.action}.")
            return 0
        print(f"twisted-mta: no queue entry {qid}: {missing}, so the queue is empty",
              file=sys.stderr)
        return 1
    spool = Spool(config.spool)
    if qid != control.ALL and spool.state_of(qid) is None:
        print(f"twisted-mta: no queue entry {qid}", file=sys.stderr)
        return 1
    try:
        spool.lock()
    except SpoolError:
        # A running MTA owns the spool: ask it.
        control.request(spool, action, qid)
        extra = f" with a one-shot {override} TLS override" if override else ""
        print(f"{args.action} {qid}{extra}: requested; the running MTA acts on it within a "
              "second")
        return 0
    if override:
        spool.unlock()
        print("twisted-mta: a TLS override needs the running MTA (it applies to the next "
              "attempt)", file=sys.stderr)
        return 1
    try:
        if qid == control.ALL:
            print("no MTA is running: all entries will be attempted when it starts")
        else:
            print(control.apply_offline(spool, args.action, qid))
    except control.ControlError as e:
        print(f"twisted-mta: {e}", file=sys.stderr)
        return 1
    finally:
        spool.unlock()
    return 0


def _read_password(args: argparse.Namespace) -> str | None:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        import getpass
        password = getpass.getpass(f"Password for {args.name}: ")
        if getpass.getpass("Again: ") != password:
            print("twisted-mta: the passwords differ", file=sys.stderr)
            return None
    if not password:
        print("twisted-mta: empty password", file=sys.stderr)
        return None
    return password


def _users_command(action):
    """
    Run C{action(args)} and report a L{UsersFileError} as one line, exit 1.
    """
    def command(args: argparse.Namespace) -> int:
        try:
            return action(args)
        except UsersFileError as e:
            print(f"twisted-mta: {e}", file=sys.stderr)
            return 1
    return command


@_users_command
def cmd_user_add(args: argparse.Namespace) -> int:
    password = _read_password(args)
    if password is None:
        return 1
    write_user(args.file, args.name, password)
    print(f"{args.file}: {args.name.lower()} set")
    return 0


@_users_command
def cmd_user_delete(args: argparse.Namespace) -> int:
    write_user(args.file, args.name, None)
    print(f"{args.file}: {args.name.lower()} removed")
    return 0


@_users_command
def cmd_user_list(args: argparse.Namespace) -> int:
    for name in sorted(read_users_file(args.file)):
        print(name)
    return 0


def cmd_dkim_record(args: argparse.Namespace) -> int:
    """
    The DKIM key records to publish, one zone-file line per [dkim] domain
    (or the one named), from the private keys the configuration names.
    """
    config = _config(args)
    if config is None:
        return 1
    from twisted_mta.dkim import DKIMKeyError, Signer
    try:
        signer = Signer.from_config(config)
    except DKIMKeyError as e:
        print(f"twisted-mta: {e}", file=sys.stderr)
        return 1
    keys = sorted(signer.keys.values(), key=lambda k: k.domain)
    if args.domain:
        keys = [k for k in keys if k.domain == args.domain.lower().rstrip(".")]
        if not keys:
            print(f"twisted-mta: {config.path}: no [dkim.domains] key for {args.domain}",
                  file=sys.stderr)
            return 1
    if not keys:
        print(f"twisted-mta: {config.path}: [dkim] has no domains: nothing to publish",
              file=sys.stderr)
        return 1
    for key in keys:
        text = key.dns_record()
        strings = " ".join(f'"{text[i:i + 255]}"' for i in range(0, len(text), 255))
        print(f"{key.dns_name}. IN TXT {strings}")
    return 0


def cmd_tls_explain(args: argparse.Namespace) -> int:
    config = _config(args)
    if config is None:
        return 1
    from twisted_mta import tap
    try:
        engine, _ = tap.prepare_tls(config)  # what the service builds, names checked
    except tap.PrepareError as e:
        print(f"twisted-mta: {e}", file=sys.stderr)
        return 1
    domains: list[str] = []
    message = None
    if args.message:
        missing = _not_yet(config)
        if missing:
            print(f"twisted-mta: no queue entry {args.message}: {missing}, so the queue is "
                  "empty", file=sys.stderr)
            return 1
        if _bad_queue_id(args.message):
            return 2
        readable, found = _find(Spool(config.spool), args.message)
        if not readable:
            return 1
        env = found[2] if found is not None else None
        if env is None:
            print(f"twisted-mta: no queue entry {args.message}", file=sys.stderr)
            return 1
        message = {"age": time.time() - env.arrival, "attempts": env.attempts,
                   "tls_failures": env.tls_failures, "requiretls": env.requiretls,
                   "tls_required_no": env.tls_required_no}
        # A UTF-8 domain (SMTPUTF8) is explained as its A-label, as delivery looks it up.
        domains = sorted({ascii_domain(r.address.rpartition("@")[2]) for r in env.pending()})
    if args.domain:
        domains.append(args.domain)
    if not domains:
        print("twisted-mta: name a DOMAIN or --message QUEUE-ID", file=sys.stderr)
        return 2

    from twisted.internet import defer, task
    from twisted.internet.threads import deferToThread

    from twisted_mta.tls.probe import explain, format_report

    reports = []

    @defer.inlineCallbacks
    def run(reactor):
        resolver = DNSResolver(config.dns)
        published = tap.make_published(config, reactor, deferToThread, resolver)
        for domain in domains:
            reports.append((yield explain(config, domain, reactor, deferToThread,
                                          resolver=resolver, message=message, tls=engine,
                                          published=published)))
    from twisted_mta.outbound.attempt import DNSResolver
    try:
        task.react(lambda reactor: run(reactor))
    except SystemExit as e:
        if e.code:
            return int(e.code)
    if args.json:
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
    else:
        print("\n".join(format_report(r) for r in reports), end="")
    return 0


def cmd_tls_sts(args: argparse.Namespace) -> int:
    """
    C{tls sts list}: the MTA-STS policies in the cache; C{tls sts show
    DOMAIN}: what delivery would use now (fetching when it would);
    C{tls sts refresh DOMAIN}: fetch now, whatever the cache says.
    """
    config = _config(args)
    if config is None:
        return 1
    if not config.outbound.tls.mta_sts:
        print("twisted-mta: MTA-STS is off ([outbound.tls] mta_sts = false)", file=sys.stderr)
        return 1
    from twisted.internet import defer, task
    from twisted.internet.threads import deferToThread

    from twisted_mta import tap
    from twisted_mta.outbound.attempt import DNSResolver
    from twisted_mta.tls.engine import sts_summary
    from twisted_mta.tls.sts import examine_sts_records
    from twisted_mta.tls.sts_cache import Lookup
    out: list[dict] = []

    def entry_json(entry) -> dict:
        return {"domain": entry.domain, "mode": entry.policy.mode, "id": entry.policy_id,
                "max_age": entry.policy.max_age, "mx": list(entry.policy.mx),
                "fetched": _utc(entry.fetched_at), "expires": _utc(entry.expires)}

    @defer.inlineCallbacks
    def run(reactor):
        resolver = DNSResolver(config.dns)
        cache = tap.make_published(config, reactor, deferToThread, resolver).sts_cache
        if args.sts_action == "list":
            out.extend(entry_json(e) for e in cache.entries().values())
            return
        if args.sts_action == "show":
            lookup: Lookup = yield cache.policy_for(args.domain)
        else:
            try:
                records = yield deferToThread(resolver.sts_txt, args.domain)
            except Exception as e:
                records, why = [], f"TXT lookup failed: {e}"
            else:
                why = ""
            record, txt_why = examine_sts_records(records)
            lookup = yield cache.refresh(args.domain, record)
            if txt_why or why:
                lookup = attrs.evolve(lookup, why="; ".join(w for w in (why, txt_why,
                                                                        lookup.why) if w))
        shown = {"domain": lookup.domain, "mode": lookup.mode, "source": lookup.source,
                 "txt_id": lookup.record.id if lookup.record else None, "why": lookup.why,
                 "summary": sts_summary(lookup) if lookup.policy is not None else None}
        if lookup.error is not None:
            shown["fetch_error"] = {"result_type": lookup.error.result_type,
                                    "detail": lookup.error.detail}
        if lookup.entry is not None:
            shown["cached"] = entry_json(lookup.entry)
        out.append(shown)
    try:
        task.react(lambda reactor: run(reactor))
    except SystemExit as e:
        if e.code:
            return int(e.code)
    if args.sts_action != "list":
        _tell_running_mta(config, "stsreload", out[0]["domain"])
    if args.json:
        print(json.dumps(out if args.sts_action == "list" else out[0], indent=2))
        return 0
    if args.sts_action == "list":
        if not out:
            print("no MTA-STS policies cached")
        for e in out:
            print(f"{e['domain']}: mode {e['mode']}, id {e['id']}, mx {', '.join(e['mx'])}; "
                  f"fetched {e['fetched']}, in force until {e['expires']}")
        return 0
    e = out[0]
    print(f"{e['domain']}: " + (e["summary"] or f"no policy in force (mode {e['mode']})"))
    print(f"  from: {e['source']}; TXT id {e['txt_id'] or 'none'}")
    if e.get("cached"):
        c = e["cached"]
        print(f"  cached: fetched {c['fetched']}, in force until {c['expires']}")
    if e.get("fetch_error"):
        f = e["fetch_error"]
        print(f"  fetch failed: {f['result_type']}: {f['detail']}")
    if e["why"]:
        print(f"  why: {e['why']}")
    return 0


def _tell_running_mta(config, action: str, target: str) -> None:
    """
    When an MTA owns the spool, ask it to act (here: re-read a policy this
    command fetched into the cache); quietly nothing when none runs.
    """
    if _not_yet(config):
        return
    spool = Spool(config.spool)
    try:
        spool.lock()
    except SpoolError:
        try:
            control.request(spool, action, target)
        except (control.ControlError, OSError):
            pass
        return
    spool.unlock()


def _utc(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC")


def cmd_tls_history(args: argparse.Namespace) -> int:
    config = _config(args)
    if config is None:
        return 1
    from twisted_mta.tls import history
    path = history.history_path(config.spool)
    missing = _not_yet(config)
    forget = args.forget or (control.ALL if args.forget_all else None)
    if forget and missing:
        print(f"no TLS history ({missing}): nothing to forget")
        return 0
    if forget:
        spool = Spool(config.spool)
        try:
            spool.lock()
        except SpoolError:
            control.request(spool, "tlsforget", forget)
            print(f"forget TLS history of {forget}: requested; the running MTA acts on it "
                  "within a second")
            return 0
        try:
            data = history.read(path)
            if forget == control.ALL:
                data = {}
            elif data.pop(forget.lower(), None) is None:
                print(f"no TLS history for {forget}")
                return 0
            history.write(path, data)
            print(f"TLS history of {forget} forgotten")
        finally:
            spool.unlock()
        return 0
    # As the MTA sees it: expired parts (history_expiry) do not count.
    h = history.TLSHistory(path, _WallClock(), None,
                           expiry=config.outbound.tls.history_expiry)
    h.load()
    entries = h.current()
    if args.domain:
        entries = {k: v for k, v in entries.items() if k == args.domain.lower()}
    if args.json:
        import attrs
        print(json.dumps({d: attrs.asdict(e) for d, e in entries.items()}, indent=2,
                         sort_keys=True))
        return 0
    if not entries:
        print("no TLS history" + (f" for {args.domain}" if args.domain else "")
              + (f" ({missing})" if missing else ""))
        return 0
    for domain, entry in entries.items():
        line = f"{domain}: {entry.describe()}"
        if entry.broken_until > time.time():
            line += f"; TLS skipped (broken) for {_ago(entry.broken_until - time.time())} more"
        print(line)
    return 0


def cmd_tls_publish(args: argparse.Namespace) -> int:
    """
    What to publish for our own domains, checked against what is
    published now; exit 1 when a check warns.

    The report is built without a reactor; when a check asks for a
    domain's published policy (its TXT id is not ours), the policies are
    fetched with Twisted and the report is built again from the same
    answers, so the reactor runs only when it is needed, and once.
    """
    config = _config(args)
    if config is None:
        return 1
    from datetime import datetime, timezone

    from twisted_mta.tls import publish
    keys = publish.load_keys(config.tls)
    now = datetime.now(timezone.utc)
    fetched: dict[str, Any] = {}
    wanted: list[str] = []

    def policy(domain: str):
        if domain not in fetched:
            wanted.append(domain)
            raise publish.LookupFailed("not fetched yet")
        if isinstance(fetched[domain], Exception):
            raise fetched[domain]
        return fetched[domain]

    lookups = _publish_lookups(config, policy)
    report = publish.build(config, keys, lookups, now)
    if wanted:
        fetched.update(_fetch_policies(config, wanted))
        report = publish.build(config, keys, lookups, now)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(publish.format_report(report), end="")
    return report.exit_code


def _publish_lookups(config, policy):
    """
    L{publish.Lookups} through the configured resolver (C{[dns]
    nameservers}, or the system's when unset), DNSSEC-aware.
    """
    from twisted_mta import nodoh  # noqa: F401  (before any dns module)
    import dns.exception
    import dns.resolver

    from twisted_mta.tls import dnssec, publish

    servers = config.dns.nameservers
    if not servers:
        try:
            system = dns.resolver.Resolver()
        except dns.exception.DNSException as e:
            why = str(e)  # the name e is unbound once the except clause ends

            def failed(name: str) -> publish.Answer:
                raise publish.LookupFailed(f"no resolver to ask: {why}")
            return publish.Lookups(tlsa=failed, txt=failed, policy=policy)
        servers = tuple(f"[{s}]:{system.port}" if ":" in s else f"{s}:{system.port}"
                        for s in system.nameservers)
    resolver = dnssec.make_resolver(servers, config.dns.timeout, config.dns.trusted_resolvers)
    return publish.dns_lookups(resolver, policy)


def _fetch_policies(config, domains: list[str]) -> dict[str, Any]:
    """
    The MTA-STS policy each of C{domains} serves now, or the
    L{publish.LookupFailed} saying why there is none.  The policy host's
    address comes from C{[dns] nameservers} when set, never the system's
    resolver then.
    """
    from twisted.internet import defer, task
    from twisted.internet.threads import deferToThread

    from twisted_mta.outbound.mx import MXError, lookup_addresses, make_resolver
    from twisted_mta.tls import publish
    from twisted_mta.tls.sts_fetch import PolicyFetcher

    resolve = None
    if config.dns.nameservers:
        plain = make_resolver(config.dns.nameservers, config.dns.timeout)

        def addresses(host: str) -> list[str]:
            try:
                return lookup_addresses(plain, host)
            except MXError as e:
                raise OSError(str(e)) from None

        def resolve(host: str):
            return deferToThread(addresses, host)
    results: dict[str, Any] = {}

    def fetched(policy, domain: str) -> None:
        results[domain] = policy

    def failed(failure, domain: str) -> None:
        results[domain] = publish.LookupFailed(str(failure.value))

    def run(reactor):
        fetcher = PolicyFetcher(reactor, resolve=resolve)
        return defer.gatherResults([
            fetcher.fetch(d).addCallbacks(fetched, failed, callbackArgs=(d,), errbackArgs=(d,))
            for d in domains])
    try:
        task.react(run)
    except SystemExit:
        pass
    return results


class _WallClock:
    def seconds(self) -> float:
        return time.time()


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def cmd_tls_report_show(args: argparse.Namespace) -> int:
    """
    The TLS-RPT reports (RFC 8460) of a UTC day so far, from the day files
    the MTA writes (at most a second behind it; it need not run): one line
    per policy domain, or the reports' exact JSON.
    """
    from twisted_mta.tlsrpt import report, store
    day = args.day or datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    try:
        datetime.date.fromisoformat(day)
    except ValueError:
        print(f"twisted-mta: --day must be a date like 2026-12-03, not {day!r}",
              file=sys.stderr)
        return 2
    config = _config(args)
    if config is None:
        return 1
    t = config.tlsrpt
    try:
        counts = store.load_day(store.directory_of(config.spool), day)
    except store.DamagedDay as e:
        print(f"twisted-mta: the TLS-RPT counts of {day} cannot be read: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"twisted-mta: cannot read the TLS-RPT counts of {day}: {e.strerror}",
              file=sys.stderr)
        return 1
    domains = sorted(counts.domains) if counts is not None else []
    if args.domain:
        wanted = report.a_label(args.domain)
        domains = [d for d in domains if report.a_label(d) == wanted]
    submitter = t.submitter_domain or config.hostname
    reports = [report.build(day, d, counts.counts(d), t.organization_name or config.hostname,
                            t.contact_address or f"postmaster@{config.hostname}",
                            report.report_id(day, d, submitter)) for d in domains]
    if args.json:
        print(json.dumps(reports[0] if args.domain and reports else reports, indent=2,
                         ensure_ascii=False))
        return 0
    for d in domains:
        print(report.describe(day, d, counts.counts(d)))
    if not domains:
        what = f"with {args.domain} " if args.domain else ""
        print(f"No TLS sessions {what}counted on {day}.")
    if counts is not None and counts.dropped:
        print(f"({counts.dropped:,} sessions with further domains were not counted: "
              f"the day reached {store.MAX_DOMAINS:,} domains)")
    if not t.enabled:
        print("([tlsrpt] enabled is false: the MTA counts nothing)")
    return 0


def cmd_tls_report_send(args: argparse.Namespace) -> int:
    """
    Ask the running MTA to send today's TLS reports so far (its operator
    requests, like C{queue flush}); the outcomes go to its log
    (C{tlsrpt.sent}, C{tlsrpt.failed}).  Only the running MTA sends: it
    owns the queue the mailed reports go through.
    """
    config = _config(args)
    if config is None:
        return 1
    if not config.tlsrpt.enabled:
        print("twisted-mta: TLS reporting is off ([tlsrpt] enabled = false): nothing to send",
              file=sys.stderr)
        return 1
    target = control.ALL
    if args.domain:
        target = args.domain.strip().rstrip(".").lower()
        if not control.valid_target("tlsrptsend", target):
            print(f"twisted-mta: {args.domain[:80]!r} is not a domain name", file=sys.stderr)
            return 1
    missing = _not_yet(config)
    spool = Spool(config.spool)
    if not missing:
        try:
            spool.lock()
        except SpoolError:
            try:
                control.request(spool, "tlsrptsend", target)
            except (control.ControlError, OSError) as e:
                print(f"twisted-mta: cannot ask the running MTA: {e}", file=sys.stderr)
                return 1
            what = f"for {target} " if target != control.ALL else ""
            print(f"requested: the running MTA sends today's TLS reports {what}within a "
                  "second; each one is logged (events tlsrpt.sent, tlsrpt.failed)")
            return 0
        spool.unlock()
    why = missing or f"nothing holds the spool {spool.path}"
    print(f"twisted-mta: the MTA is not running ({why}): start it to send reports; the days "
          "it has not reported go a minute after it starts", file=sys.stderr)
    return 1


def cmd_tls_shadow_report(args: argparse.Namespace) -> int:
    config = _config(args)
    if config is None:
        return 1
    from twisted_mta.config import _DURATION, _UNITS
    from twisted_mta.tls import shadow
    since = None
    if args.since:
        m = _DURATION.match(args.since)
        if not m:
            print(f"twisted-mta: --since must be a duration like 30m, 12h or 7d, "
                  f"not {args.since!r}", file=sys.stderr)
            return 2
        since = time.time() - int(m.group(1)) * _UNITS[m.group(2)]
    rows = shadow.summarize(shadow.read(shadow.report_path(config.spool)), since)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        missing = _not_yet(config)
        print("no shadow policy would have refused anything"
              + (f" in the last {args.since}" if args.since else "")
              + (f" ({missing})" if missing else ""))
        return 0
    print(f"{'count':>5}  {'domain':<28} {'host':<28} {'shadow':<8} class")
    for r in rows:
        print(f"{r['count']:>5}  {r['domain']:<28} {r['host']:<28} {r['shadow']:<8} "
              f"{r['kind']}" + (f" ({r['detail']})" if r["detail"] else ""))
        print(f"       {r['reason']}; seen {_ago(time.time() - r['last'])} ago last")
    return 0


def cmd_tls_inbox(args: argparse.Namespace) -> int:
    """
    Summarise the TLS reports (RFC 8460) other senders sent to our report
    mailbox.  Exit 0 when no report names a failure, 1 when one does, 2
    when the mailbox (or the configuration) cannot be read: a script can
    tell "fix something" from "could not look".  Broken reports and other
    mail are named but leave the status alone (nothing to fix here).
    """
    from datetime import datetime, timedelta, timezone

    from twisted_mta.config import parse_duration
    from twisted_mta.tlsrpt import inbox
    seconds = None
    if args.since != "all":
        try:
            seconds = parse_duration(args.since)
        except ValueError as e:
            print(f"twisted-mta: --since {e} (or all)", file=sys.stderr)
            return 2
    config = _config(args)
    if config is None:
        return 2
    try:
        boxes = inbox.find_mailboxes(config, args.mailbox)
    except inbox.MailboxError as e:
        print(f"twisted-mta: {e}", file=sys.stderr)
        return 2
    now = datetime.now(timezone.utc)
    since = now - timedelta(seconds=seconds) if seconds is not None else None
    try:
        summary = inbox.summarize(inbox.read_maildirs(b.path for b in boxes if b.exists),
                                  now, since)
    except OSError as e:
        print(f"twisted-mta: cannot read the report mailbox {e.filename}: {e.strerror}",
              file=sys.stderr)
        return 2
    if args.json:
        out = {"mailboxes": [{"name": b.name, "path": b.path, "exists": b.exists}
                             for b in boxes]}
        out.update(summary.to_dict())
        print(json.dumps(out, indent=2))
    else:
        print(inbox.format_text(summary, [b.path for b in boxes],
                                None if since is None else args.since), end="")
        for b in boxes:
            if not b.exists:
                print(f"({b.name}: its Maildir {b.path} does not exist yet: no mail has "
                      "arrived for it)")
    return summary.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twisted-mta", description="twisted-mta operator tools")
    sub = parser.add_subparsers(dest="command", required=True)
    config = sub.add_parser("config", help="check or show a configuration file")
    config_sub = config.add_subparsers(dest="action", required=True)
    check = config_sub.add_parser("check", help="validate FILE; exit non-zero with the reason")
    check.add_argument("file")
    check.set_defaults(func=cmd_config_check)
    show = config_sub.add_parser("show", help="print the effective configuration")
    show.add_argument("file")
    show.add_argument("--json", action="store_true", help="print JSON instead of key = value")
    show.add_argument("-n", dest="non_default", action="store_true",
                      help="only the keys whose value differs from the default "
                      "(like postconf -n); with --json, one flat object")
    show.set_defaults(func=cmd_config_show)

    queue = sub.add_parser("queue", help="inspect the queue; flush, hold, release or delete entries")
    queue_sub = queue.add_subparsers(dest="action", required=True)
    qlist = queue_sub.add_parser("list", help="one line per queue entry")
    qshow = queue_sub.add_parser("show", help="everything about one entry")
    qshow.add_argument("queue_id")
    for p, func in ((qlist, cmd_queue_list), (qshow, cmd_queue_show)):
        p.add_argument("-c", "--config", required=True, help="the MTA's configuration file")
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
        p.set_defaults(func=func)
    helps = {"flush": "attempt one entry (or all) now",
             "hold": "keep an entry without attempting it",
             "release": "let a held entry be attempted again, now",
             "delete": "remove an entry without telling anyone"}
    for action in helps:
        p = queue_sub.add_parser(action, help=helps[action])
        if action == "flush":
            p.add_argument("queue_id", nargs="?")
        else:
            p.add_argument("queue_id")
        if action in ("flush", "release"):
            g = p.add_mutually_exclusive_group()
            g.add_argument("--tls", choices=["relaxed"],
                           help="next attempt only: TLS required, certificate not checked")
            g.add_argument("--allow-cleartext", action="store_true",
                           help="next attempt only: cleartext allowed after a TLS failure")
        p.add_argument("-c", "--config", required=True, help="the MTA's configuration file")
        p.set_defaults(func=cmd_queue_action)

    tls = sub.add_parser("tls", help="outbound TLS: explain what would happen")
    tls_sub = tls.add_subparsers(dest="action", required=True)
    texplain = tls_sub.add_parser(
        "explain", help="probe a domain's mail servers under our policy and explain the result")
    texplain.add_argument("domain", nargs="?")
    texplain.add_argument("--message", metavar="QUEUE-ID",
                          help="explain for a queued message (its domains, age, attempts)")
    texplain.add_argument("-c", "--config", required=True, help="the MTA's configuration file")
    texplain.add_argument("--json", action="store_true", help="print JSON for scripts")
    texplain.set_defaults(func=cmd_tls_explain)
    tshadow = tls_sub.add_parser(
        "shadow-report", help="the destinations a report-only (shadow) policy would refuse")
    tshadow.add_argument("-c", "--config", required=True, help="the MTA's configuration file")
    tshadow.add_argument("--since", metavar="DURATION", help="only the last 30m, 12h, 7d, ...")
    tshadow.add_argument("--json", action="store_true", help="print JSON for scripts")
    tshadow.set_defaults(func=cmd_tls_shadow_report)
    thistory = tls_sub.add_parser(
        "history", help="what TLS each destination has shown (ratchet, broken TLS); reset it")
    thistory.add_argument("domain", nargs="?")
    thistory.add_argument("-c", "--config", required=True, help="the MTA's configuration file")
    thistory.add_argument("--json", action="store_true", help="print JSON for scripts")
    g = thistory.add_mutually_exclusive_group()
    g.add_argument("--forget", metavar="DOMAIN", help="drop one domain's history")
    g.add_argument("--forget-all", action="store_true", help="drop all TLS history")
    thistory.set_defaults(func=cmd_tls_history)
    tsts = tls_sub.add_parser("sts", help="the MTA-STS policy cache: list, show, refresh")
    sts_sub = tsts.add_subparsers(dest="sts_action", required=True)
    for name, words in (("list", "the policies in the cache"),
                        ("show", "what delivery to DOMAIN would use now (fetches if it would)"),
                        ("refresh", "fetch DOMAIN's policy now, whatever the cache says")):
        p = sts_sub.add_parser(name, help=words)
        if name != "list":
            p.add_argument("domain")
        p.add_argument("-c", "--config", required=True, help="the MTA's configuration file")
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
        p.set_defaults(func=cmd_tls_sts)
    tpublish = tls_sub.add_parser(
        "publish", help="the DANE, MTA-STS and TLS-RPT records to publish for our own "
        "domains, checked against what is published now")
    tpublish.add_argument("-c", "--config", required=True, help="the MTA's configuration file")
    tpublish.add_argument("--json", action="store_true", help="print JSON for scripts")
    tpublish.set_defaults(func=cmd_tls_publish)
    treport = tls_sub.add_parser(
        "report", help="the TLS reports (RFC 8460) this MTA sends: what it counted")
    report_sub = treport.add_subparsers(dest="report_action", required=True)
    rshow = report_sub.add_parser(
        "show", help="the reports of a UTC day so far (default today), as they would be sent")
    rshow.add_argument("domain", nargs="?", metavar="DOMAIN", help="only this policy domain")
    rshow.add_argument("--day", metavar="YYYY-MM-DD", help="the UTC day (default today)")
    rshow.add_argument("-c", "--config", required=True, help="the MTA's configuration file")
    rshow.add_argument("--json", action="store_true",
                       help="the reports' JSON (one object with DOMAIN, else a list)")
    rshow.set_defaults(func=cmd_tls_report_show)
    rsend = report_sub.add_parser(
        "send", help="send today's reports so far now, through the running MTA")
    rsend.add_argument("domain", nargs="?", metavar="DOMAIN", help="only this policy domain")
    rsend.add_argument("--now", action="store_true", required=True,
                       help="today's counts so far (the whole day still goes after midnight)")
    rsend.add_argument("-c", "--config", required=True, help="the MTA's configuration file")
    rsend.set_defaults(func=cmd_tls_report_send)
    tinbox = tls_sub.add_parser(
        "inbox", help="summarise the TLS reports (RFC 8460) other senders sent to our report "
        "mailbox: what failed, where, and what to fix")
    tinbox.add_argument("-c", "--config", required=True, help="the MTA's configuration file")
    tinbox.add_argument("--since", metavar="DURATION", default="7d",
                        help="only reports that end within the last 24h, 7d, 30d, ... "
                        "or all (default 7d)")
    tinbox.add_argument("--mailbox", metavar="USER|PATH",
                        help="the local address or Maildir path to read (default: [tlsrpt] "
                        "inbox, else the mailto: addresses tls publish suggests)")
    tinbox.add_argument("--json", action="store_true", help="print JSON for scripts")
    tinbox.set_defaults(func=cmd_tls_inbox)

    dkim = sub.add_parser("dkim", help="DKIM signing: the records to publish")
    dkim_sub = dkim.add_subparsers(dest="action", required=True)
    drecord = dkim_sub.add_parser(
        "record", help="the TXT record of each [dkim] key (or DOMAIN's), as zone-file lines")
    drecord.add_argument("domain", nargs="?")
    drecord.add_argument("-c", "--config", required=True, help="the MTA's configuration file")
    drecord.set_defaults(func=cmd_dkim_record)

    # Only for the help: main() hands "sendmail ..." to twisted_mta.sendmail
    # before argparse sees sendmail's own flags.
    sub.add_parser("sendmail", add_help=False,
                   help="submit a message like sendmail(8): -t, -i, -f, -F, -bs, -bv, -bp "
                   "(docs/operations.md)")
    user = sub.add_parser("user", help="manage the AUTH users file (scrypt hashes)")
    user_sub = user.add_subparsers(dest="action", required=True)
    add = user_sub.add_parser("add", help="add a user or change a password")
    add.add_argument("file")
    add.add_argument("name")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from one line of standard input")
    add.set_defaults(func=cmd_user_add)
    delete = user_sub.add_parser("delete", help="remove a user")
    delete.add_argument("file")
    delete.add_argument("name")
    delete.set_defaults(func=cmd_user_delete)
    ulist = user_sub.add_parser("list", help="list the users")
    ulist.add_argument("file")
    ulist.set_defaults(func=cmd_user_list)
    return parser


SENDMAIL_NAMES = ("sendmail", "mailq", "newaliases")


def _list_queue(config_path: str) -> int:
    return cmd_queue_list(argparse.Namespace(config=config_path, json=False, check_files=False))


def sendmail_main(argv: list[str] | None = None) -> int:
    """
    The sendmail command (L{twisted_mta.sendmail}), with C{-bp} listing
    the queue as C{queue list} does.
    """
    from twisted_mta import sendmail
    return sendmail.main(argv, list_queue=_list_queue)


def sendmail_script() -> None:
    """
    The console script C{twisted-mta-sendmail}.
    """
    sys.exit(sendmail_main())


def main(argv: list[str] | None = None) -> int:
    """
    The operator's commands; invoked as sendmail, mailq or newaliases
    (argv[0], a link), or as C{twisted-mta sendmail ...}, the sendmail
    command (L{twisted_mta.sendmail}), whose flags are sendmail's own.
    """
    if argv is None:
        prog = os.path.basename(sys.argv[0]) if sys.argv else ""
        if prog in SENDMAIL_NAMES:
            return sendmail_main([prog] + sys.argv[1:])
        argv = sys.argv[1:]
    if argv[:1] == ["sendmail"]:
        return sendmail_main(argv)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
