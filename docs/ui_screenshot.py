"""Screenshot of the MLflow UI comparing runs by name, taken by headless Chromium (Debian package `chromium`).

    python docs/ui_screenshot.py --tracking-uri http://127.0.0.1:5000 --experiment rlvr-demo
    python docs/ui_screenshot.py --tracking-uri http://127.0.0.1:5000 --experiment rlvr-demo \\
        --runs train_baseline,train_reasoning --output compare-arms.png

For each name in `--runs` the newest FINISHED run of that name in the experiment is compared (by default the
three evaluations of a `main` run). Chromium is driven over its DevTools pipe (no extra Python packages): the
script waits until the page shows every run name, closes the assistant panel that the UI opens on a local
server, collapses the sections named in `--collapse`, and saves the viewport as a PNG. It stops with one line
when Chromium is missing, a run is not found, or the page does not show the runs in time.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

EVALUATIONS = "evaluate warmstart,evaluate train_baseline,evaluate train_reasoning"
# Clicked once the page is loaded: the assistant panel's close button, then each section title to collapse.
PREPARE_PAGE = """
(collapse) => {
  document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]')?.click();
  for (const header of document.querySelectorAll('[role="button"][aria-expanded="true"]')) {
    if (collapse.includes(header.textContent.trim())) header.click();
  }
}
"""


class Failure(Exception):
    """A reason to stop, said in one line."""


def compared_runs(tracking_uri: str, experiment_name: str, names: list[str]) -> tuple[str, list[str]]:
    """The experiment's id and, per name, the newest FINISHED run of that name."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise Failure(f"no experiment named {experiment_name!r} at {tracking_uri}")
    run_ids = []
    for name in names:
        quoted = name.replace("'", "\\'")
        found = client.search_runs(
            [experiment.experiment_id],
            f"attributes.run_name = '{quoted}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not found:
            raise Failure(f"no finished run named {name!r} in experiment {experiment_name!r}")
        run_ids.append(found[0].info.run_id)
    return experiment.experiment_id, run_ids


def comparison_url(tracking_uri: str, experiment_id: str, run_ids: list[str]) -> str:
    query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id])})
    return f"{tracking_uri.rstrip('/')}/#/compare-runs?{query}"


class Chromium:
    """Headless Chromium spoken to over `--remote-debugging-pipe`: commands go in on fd 3, replies come out on
    fd 4, each a JSON message ended by a NUL byte."""

    def __init__(self, binary: str, profile: str, deadline: float):
        commands_in, self._commands = os.pipe()
        self._replies, replies_out = os.pipe()
        flags = [
            "--headless",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--mute-audio",
            "--disable-dev-shm-usage",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
        ]
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        wire = f'exec "$0" "$@" 3<&{commands_in} 4>&{replies_out}'  # the pipe ends on the fds Chromium reads
        self.process = subprocess.Popen(
            ["/bin/sh", "-c", wire, binary, *flags, "about:blank"],
            pass_fds=(commands_in, replies_out),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its helper processes form one group, ended together
        )
        os.close(commands_in)
        os.close(replies_out)
        self.deadline = deadline
        self._pending = b""
        self._last_id = 0

    def send(self, method: str, session: str | None = None, **params) -> dict:
        """Send one command and wait for its reply (events in between are skipped)."""
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = json.loads(self._receive())
            if reply.get("id") == self._last_id:
                if "error" in reply:
                    raise Failure(f"chromium refused {method}: {reply['error'].get('message')}")
                return reply["result"]

    def _receive(self) -> bytes:
        while b"\0" not in self._pending:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._replies], [], [], remaining)[0]:
                raise Failure("chromium did not answer in time")
            chunk = os.read(self._replies, 1 << 16)
            if not chunk:
                raise Failure(f"chromium exited (code {self.process.wait()})")
            self._pending += chunk
        message, self._pending = self._pending.split(b"\0", 1)
        return message

    def close(self) -> None:
        """Ask Chromium to quit; end its process group if it has not within 10 s."""
        try:
            quit_message = {"id": self._last_id + 1, "method": "Browser.close"}
            os.write(self._commands, json.dumps(quit_message).encode() + b"\0")
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # helpers left behind, or a browser that did not quit
        except ProcessLookupError:
            pass
        self.process.wait()
        os.close(self._commands)
        os.close(self._replies)


def screenshot(
    binary: str, url: str, names: list[str], width: int, height: int, collapse: list[str], timeout: float
) -> bytes:
    """PNG bytes of `url` once its text shows every name in `names`."""
    with tempfile.TemporaryDirectory(prefix="rlvr-chromium-") as profile:
        browser = Chromium(binary, profile, time.monotonic() + timeout)
        try:
            target = browser.send("Target.createTarget", url="about:blank")["targetId"]
            page = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            browser.send(
                "Emulation.setDeviceMetricsOverride",
                page,
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
            browser.send("Page.navigate", page, url=url)
            text = ""
            while not all(name in text for name in names):
                if time.monotonic() > browser.deadline:
                    missing = [name for name in names if name not in text]
                    raise Failure(
                        f"the MLflow UI did not show {', '.join(missing)} within {timeout:.0f} s ({url})"
                    )
                time.sleep(0.5)
                text = evaluate(browser, page, "() => document.body ? document.body.innerText : ''")
            evaluate(browser, page, PREPARE_PAGE, collapse)
            time.sleep(1.0)  # let the panel close and the sections fold
            return base64.b64decode(browser.send("Page.captureScreenshot", page, format="png")["data"])
        finally:
            browser.close()


def evaluate(browser: Chromium, page: str, function: str, *arguments):
    """Call a JavaScript function in the page with JSON arguments; its JSON result."""
    expression = f"({function})(...{json.dumps(list(arguments))})"
    reply = browser.send("Runtime.evaluate", page, expression=expression, returnByValue=True)
    return reply["result"].get("value")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="the tracking server whose UI to open (default: $MLFLOW_TRACKING_URI)",
    )
    parser.add_argument("--experiment", default="rlvr-demo", help="experiment holding the runs")
    parser.add_argument("--runs", default=EVALUATIONS, help="comma-separated run names to compare")
    parser.add_argument("--output", type=Path, default=Path("mlflow-ui-comparison.png"), help="PNG to write")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument(
        "--collapse",
        default="Visualizations,Parameters",
        help="comma-separated section titles to fold before the screenshot ('' for none)",
    )
    parser.add_argument("--timeout", type=float, default=90, help="seconds to wait for chromium and the page")
    parser.add_argument("--chromium", default="chromium", help="the Chromium executable")
    args = parser.parse_args(argv)
    try:
        binary = shutil.which(args.chromium)
        if binary is None:
            raise Failure(
                f"{args.chromium} not found: install Debian's chromium package "
                "(apt-get install --no-install-recommends chromium) or pass --chromium PATH"
            )
        if not args.tracking_uri or not args.tracking_uri.startswith(("http://", "https://")):
            raise Failure(
                "the MLflow UI needs a tracking server: pass --tracking-uri http://host:port "
                "(mlflow server or mlflow ui)"
            )
        names = [name.strip() for name in args.runs.split(",") if name.strip()]
        experiment_id, run_ids = compared_runs(args.tracking_uri, args.experiment, names)
        url = comparison_url(args.tracking_uri, experiment_id, run_ids)
        collapse = [title.strip() for title in args.collapse.split(",") if title.strip()]
        png = screenshot(binary, url, names, args.width, args.height, collapse, args.timeout)
    except Failure as failure:
        print(f"Error: {failure}", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(png)
    print(f"wrote {args.output} ({args.width}x{args.height}): {', '.join(names)} in {args.experiment}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
