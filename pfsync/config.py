"""pfsyncd settings: command-line flags over ``PFSYNCD_*`` environment over a TOML file.

One pydantic model validates all three sources, so a bad value gets the same one-line
error wherever it came from.
"""

from __future__ import annotations

import ipaddress
import secrets
import urllib.parse
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from pfsync.netif import parse_networks
from statetable.table import LIMIT_STATES_MAX, LIMIT_STATES_MIN


class ConfigError(Exception):
    """A setting that cannot be used; the message is one line."""


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return value


class NodeConfig(BaseSettings):
    """Everything a node is started with."""

    model_config = SettingsConfigDict(env_prefix="PFSYNCD_", extra="forbid")

    hostid: int = Field(
        # Hex text like the flag: settings validate their defaults, and integers are refused.
        default_factory=lambda: f"{secrets.randbits(32) or 1:x}",  # type: ignore[assignment]
        ge=1,
        le=0xFFFFFFFF,
        description="creatorid of states made here (hex)",
    )
    control: str = Field("127.0.0.1:7070", description="Control API address")
    pcap: list[Path] = Field(default_factory=list, description="capture files to replay")
    replay_speed: float = Field(0.0, ge=0.0, description="0: as fast as possible, 1: real time")
    capture: list[str] = Field(default_factory=list, description="interfaces to capture on")
    metrics: str | None = Field(None, description="Prometheus endpoint HOST:PORT (off if unset)")
    limit_states: int = Field(
        100000, ge=LIMIT_STATES_MIN, le=LIMIT_STATES_MAX, description="hard state limit"
    )
    admin_token_file: Path | None = Field(None, description="token for admin calls")
    read_token_file: Path | None = Field(
        None, description="token read calls need (the admin token also works); default: open"
    )
    # One certificate for the control API and the pfsync peer links (both ends of a peer
    # link present it; the CA must have signed the other end's).
    tls_cert: Path | None = Field(None, description="PEM certificate chain served on TLS")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    tls_ca: Path | None = Field(
        None, description="PEM CA bundle: clients and peers must present a certificate it signed"
    )
    local_net: list[str] = Field(
        default_factory=list, description="MSLT local networks (default: this host's)"
    )
    # None: the default address, given up with a warning if another process holds it.
    sync_listen: str | None = Field(
        None, description="pfsync peer endpoint (default 127.0.0.1:7071; empty: none)"
    )
    peer: list[str] = Field(default_factory=list, description="peers to sync with (HOST:PORT)")
    peer_allow: list[str] = Field(
        default_factory=list, description="certificate names of peers allowed to sync"
    )
    # sysctl name -> value, applied at start-up as `pfsysctl -w` would (like sysctl.conf).
    sysctl: dict[str, str | int | bool] = Field(default_factory=dict)

    @field_validator("local_net")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        parse_networks(value)
        return value

    @field_validator("hostid", mode="before")
    @classmethod
    def _hex_hostid(cls, value: Any) -> Any:
        # --hostid and PFSYNCD_HOSTID are hex text; a bare TOML integer (hostid = 12345) would
        # silently mean something else (decimal), so it is refused: write it quoted.
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(f'write the hostid as quoted hex (hostid = "{value:x}"), not a number')
        if isinstance(value, str):
            try:
                return int(value, 16)
            except ValueError:
                raise ValueError(f"{value!r} is not a hex number") from None
        return value

    @field_validator("control")
    @classmethod
    def _control_address(cls, value: str) -> str:
        return _host_port(value)

    @field_validator("sync_listen")
    @classmethod
    def _sync_address(cls, value: str | None) -> str | None:
        return _host_port(value) if value else value

    @field_validator("metrics")
    @classmethod
    def _metrics_address(cls, value: str | None) -> str | None:
        return _host_port(value) if value else value

    @field_validator("peer")
    @classmethod
    def _peer_addresses(cls, value: list[str]) -> list[str]:
        return [_host_port(v) for v in value]

    @model_validator(mode="after")
    def _tls_pair(self) -> NodeConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("tls_ca needs tls_cert and tls_key")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = settings_cls.model_config.get("toml_file")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file))
        return tuple(sources)


def load_config(flags: dict[str, Any], config_file: Path | None = None) -> NodeConfig:
    """Merge flags, environment and the TOML file; raise ConfigError in one line."""
    cls: type[NodeConfig] = NodeConfig
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"{config_file}: no such config file")

        class FileConfig(NodeConfig):
            model_config = SettingsConfigDict(
                **{
                    **NodeConfig.model_config,
                    "toml_file": config_file,
                }
            )

        cls = FileConfig
    try:
        return cls(**flags)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"invalid setting {where}: {msg}") from None
    except (OSError, ValueError) as exc:  # unreadable or malformed TOML
        raise ConfigError(f"{config_file}: {exc}") from None


def read_token_file(path: Path, what: str = "token") -> str:
    """The token in ``path``, stripped; ConfigError (one line) if it cannot serve as one.

    An empty token would make the expected header ``Bearer `` (anyone sending that would
    pass), and a non-ASCII one cannot travel in gRPC metadata, so both are refused.
    """
    try:
        token = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: {what} file is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} file: {exc.strerror or exc}") from None
    if not token:
        raise ConfigError(f"{path}: {what} file is empty")
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ConfigError(f"{path}: {what} must be printable ASCII without spaces")
    return token


def is_loopback_peer(peer: str) -> bool:
    """Whether a gRPC peer string (``ipv4:127.0.0.1:5555``, ``ipv6:%5B::1%5D:5555``) is local.

    gRPC percent-encodes the brackets of IPv6 peers, so the string is unquoted first.
    """
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return True
    host = urllib.parse.unquote(rest).rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
