"""`cycleqd data fetch`: download the real skills' evaluation sets from their sources.

(Placeholder: being written.)"""

from __future__ import annotations

import argparse


def add_fetch_command(data_sub) -> None:
    fetch = data_sub.add_parser("fetch", help="download the evaluation sets, checksummed")
    fetch.set_defaults(handler=run_fetch)


def run_fetch(args: argparse.Namespace) -> int:
    raise NotImplementedError
