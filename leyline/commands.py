"""The command lines of the trainer and the sidecar processes, as one contract.

Three launchers start these processes: `tolaria run` (its supervisor), the operator (the pod's
container `command`/`args`) and the tests' process kubelet. They all build the argument list
here, so a flag renamed in one place cannot leave another launcher passing the old spelling;
`tests/leyline/test_commands.py` parses every field back with the processes' own parsers.
"""

from __future__ import annotations

from dataclasses import dataclass

SIDECAR_MODULE = "tolaria_sidecar"
TRAINER_MODULE = "tolaria_trainer.worker"


def python_module(module: str, python: str = "python") -> list[str]:
    """`python -m module`: the command part of a container or a child process."""
    return [python, "-m", module]


@dataclass(frozen=True)
class SidecarCommand:
    """`python -m tolaria_sidecar` and its flags (see `tolaria_sidecar.__main__`)."""

    manifest: str
    socket: str
    run_id: str = ""
    checkpoint_dir: str = ""
    control_address: str = ""
    token_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    metrics_port: int | None = None
    metrics_address: str = ""
    cleanup_on_exit: bool = False
    remove_socket_dir: bool = False
    inject: tuple[str, ...] = ()

    def args(self) -> list[str]:
        out = ["--manifest", self.manifest, "--socket", self.socket]
        for flag, value in (
            ("--run-id", self.run_id),
            ("--checkpoint-dir", self.checkpoint_dir),
            ("--control-address", self.control_address),
            ("--token-file", self.token_file),
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--metrics-address", self.metrics_address),
        ):
            if value:
                out += [flag, value]
        if self.metrics_port is not None:
            out += ["--metrics-port", str(self.metrics_port)]
        if self.cleanup_on_exit:
            out.append("--cleanup-on-exit")
        if self.remove_socket_dir:
            out.append("--remove-socket-dir")
        for drill in self.inject:
            out += ["--inject", drill]
        return out


@dataclass(frozen=True)
class TrainerCommand:
    """`python -m tolaria_trainer.worker` and its flags (see `tolaria_trainer.worker`)."""

    manifest: str
    workdir: str
    socket: str
    attempt: int = 1
    log_format: str = "json"
    metrics_port: int | None = None
    metrics_fd: int | None = None
    profile: str = ""
    verbose: bool = False
    pod: bool = False
    inject: tuple[str, ...] = ()

    def args(self) -> list[str]:
        out = [
            "--manifest",
            self.manifest,
            "--workdir",
            self.workdir,
            "--socket",
            self.socket,
            "--attempt",
            str(self.attempt),
            "--log-format",
            self.log_format,
        ]
        if self.metrics_port is not None:
            out += ["--metrics-port", str(self.metrics_port)]
        if self.metrics_fd is not None:
            out += ["--metrics-fd", str(self.metrics_fd)]
        if self.profile:
            out += ["--profile", self.profile]
        if self.verbose:
            out.append("--verbose")
        if self.pod:
            out.append("--pod")
        for drill in self.inject:
            out += ["--inject", drill]
        return out
