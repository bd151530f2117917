"""A worker process of the BIDS App: ``python -m simpleslicenet.bids.worker SETUP_JSON``.

It loads the model once, then reads one subject's job per line on its standard input (a
:class:`~simpleslicenet.bids.scans.SubjectJob` as JSON) and answers each with one line of JSON (a
:class:`~simpleslicenet.bids.scans.SubjectResult`) on its standard output; anything else it prints goes to
its standard error. It ends when its input closes. A SIGTERM ends it, leaving the subject in progress as
it was before (:func:`simpleslicenet.atomic.staged_directory`).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

from simpleslicenet.bids.scans import ParticipantOptions, SubjectJob, SubjectRunner

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Serve jobs from standard input until it closes."""
    setup = json.loads((sys.argv[1:] if argv is None else argv)[0])
    # Answers travel on a copy of stdout; stdout itself goes to stderr, so no stray print breaks a line.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    runner = SubjectRunner(setup["bids_root"], setup["output"], ParticipantOptions(**setup["options"]))
    for line in sys.stdin:
        if not line.strip():
            continue
        result = runner.run_job(SubjectJob(**json.loads(line)))
        answers.write(json.dumps(asdict(result), allow_nan=False) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
