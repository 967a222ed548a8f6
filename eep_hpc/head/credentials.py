"""The run's credentials, made once before anything starts, in a run dir only its owner may enter (mode 700): the
control secret every head/rank/agent message is signed with, and the API key and admin token that a head running
as a Slurm job requires (other users of the cluster can reach its ports).

The config is never changed: what is made here lives in `Credentials`, and the two configs derived from it are new
values: the API's (`serve_config`, with the key and token) and the ranks' (`rank_config`, without them).
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import msgspec

from eep_hpc import signing
from eep_hpc.config import Config, ServeConfig

log = logging.getLogger("eep_hpc.head")


@dataclass(frozen=True)
class Credentials:
    api_key: str  # "" = /v1/* open
    admin_token: str  # "" = /admin/* open (only when the API is keyless too)
    secret_file: Path  # the control secret (mode 600); ranks and node agents read it
    api_key_file: Path | None = None  # set when made here (the discovery file points at it)
    admin_token_file: Path | None = None


def private_run_dir(cfg: Config) -> Path:
    """The run dir holds the run's secrets and submitit's pickled launches (jobs/): only its owner may enter it."""
    path = Path(cfg.control.run_dir)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        log.info("run dir %s: mode %o -> 700 (it holds secrets)", path, path.stat().st_mode & 0o777)
        path.chmod(0o700)
    return path


def make_credentials(cfg: Config) -> Credentials:
    """A head running as a Slurm job guards /v1/* with an API key and /admin/* with an admin token: random ones
    unless serve.api_key / serve.admin_token name them, written to <run_dir>/api-key and <run_dir>/admin-token
    (mode 600), which the owner's CLI finds through the discovery file. `eep-hpc serve` outside Slurm (a laptop,
    127.0.0.1) stays keyless unless configured; but once serve.api_key is set, /admin/* is never left open: without
    serve.admin_token a random token is made and written to <run_dir>/admin-token the same way. The control secret goes to control.secret_file (default
    <run_dir>/control-secret) before any rank starts."""
    run_dir = private_run_dir(cfg)
    in_slurm = bool(os.environ.get("SLURM_JOB_ID"))
    api_key, api_key_file = cfg.serve.api_key, None
    if not api_key and in_slurm:
        api_key = "sk-eep-" + secrets.token_urlsafe(32)
        api_key_file = signing.write_private(run_dir / "api-key", api_key)
    admin_token, admin_token_file = cfg.serve.admin_token, None
    if not admin_token and (in_slurm or api_key):  # a keyed API never leaves scaling open to anyone
        admin_token = secrets.token_urlsafe(32)
        admin_token_file = signing.write_private(run_dir / "admin-token", admin_token)
    secret_file = signing.write_secret(cfg.control.secret_file or run_dir / signing.SECRET_FILE,
                                       signing.ensure_secret())
    return Credentials(api_key, admin_token, secret_file, api_key_file, admin_token_file)


def serve_config(cfg: Config, creds: Credentials) -> ServeConfig:
    """The API's: with the key and token in force."""
    return msgspec.structs.replace(cfg.serve, api_key=creds.api_key, admin_token=creds.admin_token)


def rank_config(cfg: Config, creds: Credentials) -> Config:
    """The config ranks get (RankLaunch.config, pickled by submitit into run_dir/jobs): the control secret's file,
    the run dir as an absolute path (ranks keep the run's Triton cache there), and no API key or admin token,
    which ranks never need."""
    serve = msgspec.structs.replace(cfg.serve, api_key="", admin_token="")
    control = msgspec.structs.replace(cfg.control, secret_file=str(creds.secret_file),
                                      run_dir=str(Path(cfg.control.run_dir).resolve()))
    return msgspec.structs.replace(cfg, serve=serve, control=control)
