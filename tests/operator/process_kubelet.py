"""A kubelet for kmock that runs each pod's containers as real local processes.

kmock serves pods but nothing runs them. This plays the node: for every pod the operator
creates it materialises the pod's volumes as directories (the manifest ConfigMap and the
token Secret written out as files, `/dev/shm` as a directory on the host's tmpfs), runs each
container's own `command` + `args` with the mount paths rewritten to those directories, and
patches the pod's status the way a kubelet does (native sidecar first, its startup gate, the
trainer's termination message and exit code, in-place restarts under `OnFailure`).

Only what cannot exist on one machine is rewritten: mount paths, and listening ports (the
control port becomes an ephemeral 127.0.0.1 port reported through `address_of`, metrics
ports become 0). Drills are appended to the trainer's arguments the way `tolaria drills`
injects them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from leyline.lifecycle import child_environment

READY_TIMEOUT_S = 60.0
_SHM_ROOT = Path("/dev/shm")
_CONTROL = re.compile(r"control=(\S+)")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Container:
    name: str
    argv: list[str]
    env: dict[str, str]
    termination_log: Path | None
    proc: subprocess.Popen[str] | None = None
    restarts: int = 0
    started_at: str = ""
    log: Path | None = None


@dataclass
class PodProcesses:
    """One pod's containers as processes, and the directories standing in for its volumes."""

    namespace: str
    name: str
    run: str
    root: Path
    shm: Path
    sidecar: _Container
    trainer: _Container
    native: bool
    control_address: str = ""
    finished: bool = False
    extra_trainer_args: list[str] = field(default_factory=list)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after `grace_s` (a kubelet's termination grace period)."""
        for container in (self.trainer, self.sidecar):
            proc = container.proc
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for container in (self.trainer, self.sidecar):
            proc = container.proc
            if proc is None:
                continue
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=60)
        shutil.rmtree(self.shm, ignore_errors=True)


class ProcessKubelet:
    """Runs the operator's pods from kmock as local processes (see the module docstring)."""

    def __init__(
        self,
        *,
        get: Callable[[str, str | None, str], dict[str, Any] | None],
        list_pods: Callable[[], list[dict[str, Any]]],
        patch_status: Callable[[str, dict[str, Any], str, dict[str, Any] | None], Any],
        workdir: Path,
        drills: dict[str, list[str]] | None = None,
        node: str = "node-a",
    ) -> None:
        self._get = get
        self._list_pods = list_pods
        self._patch_status = patch_status
        self._workdir = workdir
        self.drills = drills or {}
        self._node = node
        self.pods: dict[tuple[str, str], PodProcesses] = {}
        self._task: asyncio.Task[None] | None = None
        self.error: Exception | None = None
        """Why the node loop stopped (a pod that could not start), re-raised by `close`."""

    # -- the operator's view ------------------------------------------------------------------

    def address_of(self, namespace: str, run: str) -> str | None:
        """The control address of the run's live pod (what its headless Service resolves to)."""
        for pod in self.pods.values():
            if pod.namespace == namespace and pod.run == run and not pod.finished:
                return pod.control_address or None
        return None

    def logs(self, run: str) -> str:
        out = []
        for pod in self.pods.values():
            if pod.run != run:
                continue
            for container in (pod.sidecar, pod.trainer):
                if container.log is not None and container.log.is_file():
                    text = container.log.read_text(errors="replace")
                    out.append(f"--- {pod.name}/{container.name} ---\n{text[-4000:]}")
        return "\n".join(out)

    # -- the node loop ------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task  # a failure is in self.error, raised below
        # The node goes away with the test: a short grace, the hung trainer is killed.
        await asyncio.gather(*(asyncio.to_thread(p.stop, 2.0) for p in self.pods.values()))
        if self.error is not None:
            raise RuntimeError(f"the process kubelet stopped: {self.error}") from self.error

    async def _loop(self) -> None:
        try:
            await self._run()
        except Exception as err:  # surfaced by close(): a dead node must fail the test
            self.error = err
            raise

    async def _run(self) -> None:
        while True:
            for pod in self._list_pods():
                meta = pod["metadata"]
                key = (meta["namespace"], meta["name"])
                if key not in self.pods:
                    self.pods[key] = await self._admit(pod)
            for key, pod in list(self.pods.items()):
                if pod.finished:
                    continue
                if self._get("pods", key[0], key[1]) is None:  # deleted by the operator
                    pod.finished = True
                    await asyncio.to_thread(pod.stop)
                    continue
                await self._check(pod)
            await asyncio.sleep(0.2)

    # -- admitting a pod ---------------------------------------------------------------------

    def _volume_dirs(self, pod: dict[str, Any], root: Path, shm: Path) -> dict[str, Path]:
        namespace = pod["metadata"]["namespace"]
        dirs: dict[str, Path] = {}
        for volume in pod["spec"]["volumes"]:
            name = volume["name"]
            empty = volume.get("emptyDir")
            path = shm if empty is not None and empty.get("medium") == "Memory" else root / name
            path.mkdir(parents=True, exist_ok=True)
            dirs[name] = path
            if "configMap" in volume:
                source = self._get("configmaps", namespace, volume["configMap"]["name"])
                if source is None:
                    raise RuntimeError(f"configmap {volume['configMap']['name']} missing")
                for key, text in (source.get("data") or {}).items():
                    (path / key).write_text(text, encoding="utf-8")
            if "secret" in volume:
                source = self._get("secrets", namespace, volume["secret"]["secretName"])
                if source is None:
                    raise RuntimeError(f"secret {volume['secret']['secretName']} missing")
                for key, b64 in (source.get("data") or {}).items():
                    (path / key).write_bytes(base64.b64decode(b64))
                    (path / key).chmod(0o440)
        return dirs

    def _container(
        self,
        spec: dict[str, Any],
        dirs: dict[str, Path],
        shm: Path,
        root: Path,
        fields: dict[str, str],
    ) -> _Container:
        mounts = sorted(
            ((m["mountPath"], dirs[m["name"]]) for m in spec.get("volumeMounts", [])),
            key=lambda item: -len(item[0]),
        )

        def rewrite(text: str) -> str:
            for mount, host in mounts:
                if text == mount or text.startswith(mount + "/"):
                    return str(host) + text[len(mount) :]
            return text

        command = [sys.executable if c == "python" else c for c in spec["command"]]
        args = [rewrite(a) for a in spec.get("args", [])]
        for i, arg in enumerate(args[:-1]):
            if arg == "--control-address":
                args[i + 1] = "127.0.0.1:0"
            elif arg in ("--metrics-port",):
                args[i + 1] = "0"
        env = {
            **os.environ,
            **{e["name"]: rewrite(e["value"]) for e in spec.get("env", []) if "value" in e},
            **{
                e["name"]: fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
                for e in spec.get("env", [])
                if "fieldRef" in e.get("valueFrom", {})
            },
            "TOLARIA_SHM_DIR": str(shm),
            "PYTHONUNBUFFERED": "1",
            **child_environment(signal.SIGKILL),
        }
        termination: Path | None = None
        if "terminationMessagePath" in spec:
            termination = root / f"{spec['name']}.termination-log"
            args += ["--termination-log", str(termination)]
        return _Container(spec["name"], [*command, *args], env, termination)

    async def _admit(self, pod: dict[str, Any]) -> PodProcesses:
        meta = pod["metadata"]
        run = meta["labels"]["tolaria.dev/run"]
        root = Path(tempfile.mkdtemp(prefix=f"{meta['name']}-", dir=self._workdir))
        shm = Path(tempfile.mkdtemp(prefix=f"tolaria-kubelet-{meta['name']}-", dir=_SHM_ROOT))
        dirs = self._volume_dirs(pod, root, shm)
        native = bool(pod["spec"].get("initContainers"))
        specs = pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
        fields = {  # what the downward API gives a container
            "metadata.uid": meta.get("uid") or str(uuid.uuid4()),
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
        }
        by_name = {s["name"]: self._container(s, dirs, shm, root, fields) for s in specs}
        processes = PodProcesses(
            namespace=meta["namespace"],
            name=meta["name"],
            run=run,
            root=root,
            shm=shm,
            sidecar=by_name["sidecar"],
            trainer=by_name["trainer"],
            native=native,
            extra_trainer_args=list(self.drills.get(run, [])),
        )
        await self._start_sidecar(processes)
        self._start_trainer(processes)
        await self._report(processes, phase="Running")
        return processes

    async def _start_sidecar(self, pod: PodProcesses) -> None:
        container = pod.sidecar
        container.log = pod.root / "sidecar.log"
        with container.log.open("a") as log:
            container.proc = subprocess.Popen(
                container.argv,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=container.env,
                cwd=pod.root,
            )
        container.started_at = _now()
        line = await asyncio.to_thread(self._read_ready, container.proc)
        match = _CONTROL.search(line)
        if not line.startswith("READY") or match is None:
            raise RuntimeError(f"sidecar of {pod.name} did not start: {line!r}")
        pod.control_address = match.group(1)
        threading.Thread(target=self._drain, args=(container,), daemon=True).start()

    @staticmethod
    def _read_ready(proc: subprocess.Popen[str]) -> str:
        box: list[str] = []
        reader = threading.Thread(
            target=lambda: box.append(proc.stdout.readline() if proc.stdout else ""),
            daemon=True,
        )
        reader.start()
        reader.join(READY_TIMEOUT_S)
        return box[0] if box else ""

    @staticmethod
    def _drain(container: _Container) -> None:
        proc = container.proc
        if proc is None or proc.stdout is None or container.log is None:
            return
        with container.log.open("a") as log:
            for line in proc.stdout:
                log.write(line)

    def _start_trainer(self, pod: PodProcesses) -> None:
        container = pod.trainer
        container.log = pod.root / "trainer.log"
        argv = list(container.argv)
        if container.restarts == 0:  # a drill fires once; a restarted container gets none
            argv += pod.extra_trainer_args
        with container.log.open("a") as log:
            container.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=container.env, cwd=pod.root
            )
        container.started_at = _now()

    # -- watching it -------------------------------------------------------------------------

    async def _check(self, pod: PodProcesses) -> None:
        trainer = pod.trainer.proc
        if trainer is None or trainer.poll() is None:
            return
        code = trainer.returncode
        message = ""
        if pod.trainer.termination_log is not None and pod.trainer.termination_log.is_file():
            message = pod.trainer.termination_log.read_text(encoding="utf-8")
        if code != 0:  # restartPolicy OnFailure: restart in place, /dev/shm intact
            terminated = self._terminated(code, message)
            pod.trainer.restarts += 1
            self._start_trainer(pod)
            await self._report(pod, phase="Running", last_trainer_state=terminated)
            return
        pod.finished = True
        await asyncio.to_thread(pod.stop)
        await self._report(
            pod, phase="Succeeded", trainer_state={"terminated": self._terminated(0, message)}
        )

    def _terminated(self, code: int, message: str) -> dict[str, Any]:
        reason = "Completed" if code == 0 else "Error"
        return {
            "exitCode": code if code >= 0 else 128 - code,
            "reason": reason,
            "message": message,
            "startedAt": _now(),
            "finishedAt": _now(),
        }

    async def _report(
        self,
        pod: PodProcesses,
        *,
        phase: str,
        trainer_state: dict[str, Any] | None = None,
        last_trainer_state: dict[str, Any] | None = None,
    ) -> None:
        running = {"running": {"startedAt": pod.trainer.started_at}}
        trainer: dict[str, Any] = {
            "name": "trainer",
            "restartCount": pod.trainer.restarts,
            "ready": phase == "Running",
            "state": trainer_state or running,
        }
        if last_trainer_state is not None:
            trainer["lastState"] = {"terminated": last_trainer_state}
        sidecar_state: dict[str, Any] = (
            {"running": {"startedAt": pod.sidecar.started_at}}
            if phase == "Running"
            else {"terminated": self._terminated(0, "")}
        )
        sidecar = {
            "name": "sidecar",
            "restartCount": 0,
            "ready": phase == "Running",
            "started": phase == "Running",
            "state": sidecar_state,
        }
        status: dict[str, Any] = {"phase": phase, "containerStatuses": [trainer]}
        if pod.native:
            status["initContainerStatuses"] = [sidecar]
        else:
            status["containerStatuses"].append(sidecar)
        await self._patch_status(pod.name, status, pod.namespace, {"nodeName": self._node})
