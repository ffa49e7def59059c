#!/usr/bin/env python3
"""Prints the test suite's time per crate and what was not run, and why.

Reads nextest's JUnit report (target/nextest/default/junit.xml, configured
in .config/nextest.toml) and the `#[ignore = "reason"]` attributes in the
workspace's sources. Usage: scripts/test-summary.py JUNIT_XML [SRC_DIR]
"""
import collections
import os
import re
import sys
import xml.etree.ElementTree as ET

IGNORE_RE = re.compile(r'#\[ignore\s*=\s*"((?:[^"\\]|\\.)*)"\]')
FN_RE = re.compile(r"\bfn\s+([A-Za-z0-9_]+)")


PKG_RE = re.compile(r'^\[package\][^\[]*?^name\s*=\s*"([^"]+)"', re.M | re.S)


def package_of(path, cache={}):
    """The package name in the nearest Cargo.toml above `path`."""
    d = os.path.dirname(os.path.abspath(path))
    while d not in cache:
        toml = os.path.join(d, "Cargo.toml")
        if os.path.isfile(toml):
            m = PKG_RE.search(open(toml, encoding="utf-8").read())
            if m:
                cache[d] = m.group(1)
                break
        parent = os.path.dirname(d)
        if parent == d:
            cache[d] = "?"
            break
        d = parent
    return cache[d]


def ignore_reasons(src_dir):
    """(package, test function, reason) for each #[ignore = "..."]."""
    reasons = []
    for root, dirs, files in os.walk(src_dir):
        dirs[:] = [d for d in dirs if d not in ("target", ".git", ".cache", "node_modules")]
        for name in files:
            if not name.endswith(".rs"):
                continue
            try:
                text = open(os.path.join(root, name), encoding="utf-8").read()
            except (OSError, UnicodeDecodeError):
                continue
            for m in IGNORE_RE.finditer(text):
                f = FN_RE.search(text, m.end())
                if f:
                    path = os.path.join(root, name)
                    reasons.append((package_of(path), f.group(1), m.group(1)))
    return reasons


def main():
    if len(sys.argv) < 2:
        print("usage: test-summary.py JUNIT_XML [SRC_DIR]", file=sys.stderr)
        return 2
    junit = sys.argv[1]
    src = sys.argv[2] if len(sys.argv) > 2 else "."
    try:
        tree = ET.parse(junit)
    except (OSError, ET.ParseError) as e:
        print(f"test-summary: cannot read {junit}: {e}", file=sys.stderr)
        return 1
    crates = collections.OrderedDict()
    flaky = []
    for suite in tree.getroot().iter("testsuite"):
        crate = suite.get("name", "?").split("::")[0]
        c = crates.setdefault(crate, {"tests": 0, "failed": 0, "not_run": 0, "secs": 0.0})
        for case in suite.iter("testcase"):
            c["tests"] += 1
            c["secs"] += float(case.get("time", "0") or 0)
            if case.find("failure") is not None or case.find("error") is not None:
                c["failed"] += 1
            elif case.find("flakyFailure") is not None or case.find("flakyError") is not None:
                # Passed on a retry (.config/nextest.toml): shown, not hidden.
                flaky.append(f"{suite.get('name', '?')} {case.get('name', '?')}")
    # nextest's JUnit report leaves ignored tests out: they come from the
    # sources, with their reasons.
    ignored = ignore_reasons(src)
    for pkg, _, _ in ignored:
        crates.setdefault(pkg, {"tests": 0, "failed": 0, "not_run": 0, "secs": 0.0})["not_run"] += 1
    print("test-summary: time per crate (test time summed; up to two tests run at once)")
    print(f"  {'crate':28} {'run':>6} {'failed':>6} {'not run':>7} {'minutes':>8}")
    for name, c in sorted(crates.items(), key=lambda kv: -kv[1]["secs"]):
        print(f"  {name:28} {c['tests']:6} {c['failed']:6} {c['not_run']:7} {c['secs'] / 60:8.1f}")
    total = sum(c["secs"] for c in crates.values())
    print(f"  {'all':28} {sum(c['tests'] for c in crates.values()):6} "
          f"{sum(c['failed'] for c in crates.values()):6} {len(ignored):7} {total / 60:8.1f}")
    if flaky:
        print(f"test-summary: {len(flaky)} FLAKY (failed once, passed on the retry):")
        for name in flaky:
            print(f"  FLAKY {name}")
    by_reason = collections.Counter(reason for _, _, reason in ignored)
    if by_reason:
        print(f"test-summary: {len(ignored)} tests not run by this command (#[ignore], see integration-tests/README.md), by reason:")
        for reason, n in sorted(by_reason.items(), key=lambda kv: -kv[1]):
            print(f"  {n:3}  {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
