"""Coverage-guided fuzzing of snapferry's parsers with atheris, or a hypothesis-driven loop where atheris is missing.

    python3 -m fuzz.fuzz_parsers --all --runs 100000            # every target, one after another
    python3 -m fuzz.fuzz_parsers --target nvlist --runs 20000 --seed 7
    python3 -m fuzz.fuzz_parsers --target stream --replay fuzz/crashes/stream-*.bin

Run from the repository root (the `fuzz` package is imported from there); snapferry is the installed
one (`pip install -e .`), or another checkout's with PYTHONPATH=src.

Every input must end in a parse that passes the target's oracles or in one of its allowed exceptions
with a one-line message, within --timeout seconds; the peak RSS may grow by at most --rss-bound-mb
over a run. A violation prints the target and the exception, saves the input under fuzz/crashes/ and
exits non-zero (after the run with --keep-going).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parents[1]
CRASHES = ROOT / "fuzz" / "crashes"
MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"
# Children and the re-exec run the module, not the file: as a script, `fuzz` would not be importable.
SELF = [sys.executable, "-m", "fuzz.fuzz_parsers"]

atheris: ModuleType | None
try:
    import atheris  # type: ignore[import-untyped,no-redef,unused-ignore]
except ImportError:  # the fallback is slower and not coverage-guided, but checks the same contract
    atheris = None


def _load_targets() -> ModuleType:
    if atheris is not None:
        # Instrumented for coverage feedback: snapferry's code, and the mutation program's choices.
        with atheris.instrument_imports(include=["snapferry", "fuzz.targets"]):
            from fuzz import targets
    else:
        from fuzz import targets
    return targets


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Report:
    target: str
    engine: str
    inputs: int = 0
    seconds: float = 0.0
    rate: float = 0.0
    rss_start_mib: float = 0.0
    rss_end_mib: float = 0.0
    slowest_ms: float = 0.0
    worst_input_mib: float = 0.0
    malloc_mmap_threshold: str = field(default_factory=lambda: os.environ.get(MMAP_THRESHOLD, "glibc default"))
    crashes: list[str] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    failure: str = ""


class Session:
    """Runs one target's inputs: the contract checks, the figures, and what is saved on a finding."""

    def __init__(self, target: Any, runs: int, timeout: float, rss_bound: float, keep_going: bool, json_out: Path | None) -> None:
        self.target = target
        self.runs = runs
        self.timeout = timeout
        self.rss_bound = rss_bound
        self.keep_going = keep_going
        self.json_out = json_out
        self.report = Report(target.name, "atheris" if atheris is not None else "hypothesis")
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.started = 0.0
        self.seen: set[str] = set()
        self.worst_input = b""

    def one(self, data: bytes) -> None:
        if self.report.inputs == 0:
            # After imports and seed loading: growth from here on is what the inputs cost.
            self.started = time.perf_counter()
            self.report.rss_start_mib = _peak_rss_mib()
        begun, rss_before = time.perf_counter(), _peak_rss_mib()
        try:
            label = self.target.run(data)
        except Exception as exc:  # any exception a target lets out is a finding
            self.finding(data, exc)
            label = f"FINDING:{type(exc).__name__}"
        took = time.perf_counter() - begun
        self.report.slowest_ms = max(self.report.slowest_ms, took * 1000)
        if took > self.timeout:
            self.finding(data, TimeoutError(f"one input took {took:.2f} s, more than {self.timeout} s"))
        # The input that raised the peak the most is the one to look at when the bound is broken.
        grew = _peak_rss_mib() - rss_before
        if grew > self.report.worst_input_mib:
            self.report.worst_input_mib = round(grew, 1)
            self.worst_input = data
        if grew >= self.rss_bound:
            self.finding(data, MemoryError(f"one input raised the peak RSS by {grew:.0f} MiB, the bound is {self.rss_bound} MiB"))
        self.outcomes[label] += 1
        self.report.inputs += 1
        if self.report.inputs >= self.runs:
            self.finish()

    def finding(self, data: bytes, exc: BaseException) -> None:
        # One finding per exception type and place, however many inputs hit it: the first input is kept.
        where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
        key = f"{type(exc).__name__} at {where[0].filename}:{where[0].lineno}" if where else type(exc).__name__
        if key not in self.seen:
            self.seen.add(key)
            kind = "slow" if isinstance(exc, TimeoutError) else "memory" if isinstance(exc, MemoryError) else "crash"
            CRASHES.mkdir(parents=True, exist_ok=True)
            path = CRASHES / f"{self.target.name}-{kind}-{hashlib.sha1(data).hexdigest()[:16]}.bin"
            path.write_bytes(data)
            trace = "".join(traceback.format_exception(exc))
            path.with_suffix(".txt").write_text(f"target {self.target.name}\n{trace}")
            print(f"\n*** {self.target.name}: {type(exc).__name__}: {exc}\n*** input saved to {path}\n{trace}", file=sys.stderr, flush=True)
            self.report.crashes.append(f"{key}: {str(exc)[:200]} ({path.name})")
        if not self.keep_going:
            self.report.failure = f"{type(exc).__name__}: {exc}"
            self.finish()

    def finish(self) -> NoReturn:
        report = self.report
        report.seconds = round(time.perf_counter() - self.started, 2)
        report.rate = round(report.inputs / report.seconds, 1) if report.seconds else 0.0
        report.rss_end_mib = _peak_rss_mib()
        report.outcomes = dict(self.outcomes.most_common())
        growth = report.rss_end_mib - report.rss_start_mib
        if growth >= self.rss_bound and not report.failure:
            report.failure = f"peak RSS grew by {growth:.1f} MiB, the bound is {self.rss_bound} MiB"
            CRASHES.mkdir(parents=True, exist_ok=True)
            (CRASHES / f"{report.target}-worst-rss.bin").write_bytes(self.worst_input)
        if report.crashes and not report.failure:
            report.failure = f"{len(report.crashes)} finding(s)"
        print(
            f"{report.target}: {report.inputs} inputs in {report.seconds} s ({report.rate}/s), peak RSS "
            f"{report.rss_start_mib:.1f} -> {report.rss_end_mib:.1f} MiB (one input at most +{report.worst_input_mib} MiB), "
            f"slowest {report.slowest_ms:.0f} ms, "
            f"{len(report.crashes)} finding(s){'; FAILED: ' + report.failure if report.failure else ''}",
            flush=True,
        )
        print(f"  outcomes: {report.outcomes}", flush=True)
        if self.json_out is not None:
            self.json_out.write_text(json.dumps(asdict(report), indent=2))
        sys.stdout.flush()
        sys.stderr.flush()
        # libFuzzer never returns from Fuzz() and runs no Python atexit handlers: leave from here.
        os._exit(1 if report.failure else 0)


def run_atheris(session: Session, seeds: tuple[bytes, ...], args: argparse.Namespace, max_len: int) -> NoReturn:
    assert atheris is not None
    corpus = Path(args.corpus) if args.corpus else Path(tempfile.mkdtemp(prefix=f"snapferry-fuzz-{session.target.name}-"))
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        (corpus / f"seed-{hashlib.sha1(seed).hexdigest()[:16]}").write_bytes(seed)
    CRASHES.mkdir(parents=True, exist_ok=True)
    finish = session.finish

    def finish_and_clean() -> NoReturn:
        if not args.corpus:
            shutil.rmtree(corpus, ignore_errors=True)
        finish()

    session.finish = finish_and_clean  # type: ignore[method-assign]
    libfuzzer = [
        sys.argv[0],
        "-runs=-1",  # the session stops at --runs itself, to report before libFuzzer exits
        f"-seed={args.seed}",
        f"-max_len={max_len}",
        # A hang kills the process from libFuzzer's alarm; the session flags anything slower than --timeout.
        f"-timeout={max(1, round(args.timeout * 2))}",
        f"-rss_limit_mb={args.rss_limit_mb}",
        f"-artifact_prefix={CRASHES}/{session.target.name}-",
        "-print_final_stats=0",
        str(corpus),
    ]
    atheris.Setup(libfuzzer, session.one)
    atheris.Fuzz()
    raise AssertionError("atheris.Fuzz() returned")


def run_hypothesis(session: Session, seeds: tuple[bytes, ...], args: argparse.Namespace, max_len: int, targets: ModuleType) -> NoReturn:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st

    inputs = st.one_of(st.binary(max_size=max_len), targets.mutations(seeds, max_len))

    @hypothesis_seed(args.seed)
    @settings(max_examples=args.runs, deadline=None, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(inputs)
    def loop(data: bytes) -> None:
        session.one(data)

    for seed in seeds:
        session.one(seed[:max_len])
    while True:  # hypothesis may stop a little short of max_examples: go again until the session ends
        loop()


def fuzz_one(args: argparse.Namespace) -> NoReturn:
    targets = _load_targets()
    target = targets.TARGETS[args.target]
    max_len = args.max_len or target.max_len
    seeds = tuple(s for s in target.seeds())
    json_out = Path(args.json_out) if args.json_out else None
    session = Session(target, args.runs, args.timeout, args.rss_bound_mb, args.keep_going, json_out)
    if args.hypothesis:
        session.report.engine = "hypothesis"
    print(f"{target.name}: {target.covers}; {len(seeds)} seeds, max_len {max_len}, engine {session.report.engine}", flush=True)
    if atheris is not None and not args.hypothesis:
        run_atheris(session, seeds, args, max_len)
    session.report.engine = "hypothesis"
    run_hypothesis(session, seeds, args, max_len, targets)


def replay(args: argparse.Namespace) -> int:
    targets = _load_targets()
    target = targets.TARGETS[args.target]
    failed = 0
    for name in args.replay:
        data = Path(name).read_bytes()
        try:
            print(f"{name}: {target.run(data)}")
        except Exception:
            failed += 1
            print(f"{name}: FINDING\n{traceback.format_exc()}")
    return 1 if failed else 0


def fuzz_all(args: argparse.Namespace, names: list[str]) -> int:
    """Each target in its own process (libFuzzer runs one per process), `--jobs` at a time; a table at the end."""
    reports: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="snapferry-fuzz-") as tmp:
        pending = list(names)
        running: dict[str, tuple[subprocess.Popen[bytes], Path, float]] = {}
        while pending or running:
            while pending and len(running) < args.jobs:
                name = pending.pop(0)
                out = Path(tmp) / f"{name}.json"
                command = [*SELF, "--target", name, "--runs", str(args.runs), "--seed", str(args.seed)]
                command += ["--json-out", str(out), "--timeout", str(args.timeout), "--rss-bound-mb", str(args.rss_bound_mb)]
                command += ["--rss-limit-mb", str(args.rss_limit_mb)]
                command += (["--max-len", str(args.max_len)] if args.max_len else []) + (["--keep-going"] if args.keep_going else [])
                command += ["--hypothesis"] if args.hypothesis else []
                running[name] = (subprocess.Popen(command), out, time.monotonic())
            time.sleep(0.2)
            for name, (process, out, began) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[name]
                if out.exists():
                    reports[name] = json.loads(out.read_text())
                else:
                    stopped = f"stopped by libFuzzer (exit {process.returncode}): see fuzz/crashes/"
                    reports[name] = asdict(Report(name, "atheris", failure=stopped))
                reports[name]["wall_seconds"] = round(time.monotonic() - began, 1)
    print("\n| target | engine | inputs | inputs/s | wall s | peak RSS start -> end (MiB) | slowest input (ms) | findings |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | --- |")
    for name in names:
        r = reports[name]
        findings = "; ".join(r["crashes"]) or ("0" if not r["failure"] else r["failure"])
        rss = f"{r['rss_start_mib']:.1f} -> {r['rss_end_mib']:.1f}"
        figures = f"{r['inputs']} | {r['rate']:.0f} | {r['wall_seconds']} | {rss} | {r['slowest_ms']:.0f}"
        print(f"| {name} | {r['engine']} | {figures} | {findings} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(reports, indent=2))
    return 1 if any(r["failure"] for r in reports.values()) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--target", help="one target (see --list)")
    which.add_argument("--all", action="store_true", help="every target, each in its own process")
    which.add_argument("--list", action="store_true", help="list the targets")
    parser.add_argument("--runs", type=int, default=100_000, help="inputs per target (default 100000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-len", type=int, default=0, help="longest input (default: per target)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds any one input may take (default 2)")
    parser.add_argument("--rss-bound-mb", type=float, default=64.0, help="allowed growth of peak RSS over a run (default 64)")
    parser.add_argument("--rss-limit-mb", type=int, default=2048, help="libFuzzer kills the process above this RSS")
    parser.add_argument("--keep-going", action="store_true", help="record every finding instead of stopping at the first")
    parser.add_argument("--hypothesis", action="store_true", help="use the hypothesis loop even when atheris is installed")
    parser.add_argument("--jobs", type=int, default=1, help="targets run at once with --all")
    parser.add_argument("--corpus", help="keep the working corpus in this directory (one target)")
    parser.add_argument("--json-out", help="write the figures as JSON here")
    parser.add_argument("--replay", nargs="+", metavar="FILE", help="run these inputs through --target and stop")
    args = parser.parse_args(argv)
    if sys.platform == "linux" and MMAP_THRESHOLD not in os.environ and not (args.list or args.replay):
        # glibc raises its mmap threshold after the first freed multi-MiB buffer (a claimed 16 MiB payload)
        # and keeps later ones in a fragmenting heap: peak RSS then creeps with nothing held, and the bound
        # would measure the allocator. Fixed at glibc's initial 128 KiB, big buffers go back when freed.
        env = {**os.environ, MMAP_THRESHOLD: str(128 << 10)}
        os.execve(sys.executable, [*SELF, *(sys.argv[1:] if argv is None else argv)], env)
    if args.list:
        for name, target in _load_targets().TARGETS.items():
            print(f"{name:16} {target.covers}")
        return 0
    if args.replay:
        return replay(args)
    if args.all:
        from fuzz.targets import TARGETS  # not instrumented: this process only starts the others

        return fuzz_all(args, list(TARGETS))
    fuzz_one(args)


if __name__ == "__main__":
    if not __package__:
        sys.exit("run it from the repository root as `python3 -m fuzz.fuzz_parsers`: it imports the fuzz package")
    sys.exit(main())
