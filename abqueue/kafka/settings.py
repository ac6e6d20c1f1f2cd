"""Kafka connection settings: flags or ABQ_-prefixed environment variables, never logged with secrets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


class KafkaSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ABQ_", extra="ignore")

    # ABQ_BOOTSTRAP_SERVERS wins (the settings source), then KAFKA_BOOTSTRAP_SERVERS, which CI
    # systems and testcontainers set, then the local broker's address.
    bootstrap_servers: str = Field(
        default_factory=lambda: os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or DEFAULT_BOOTSTRAP,
        description="host:port[,host:port...]",
    )
    client_id: str = Field(default="abqueue", description="the client id brokers log and quote")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="how clients talk to the brokers"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None, description="with a SASL security protocol"
    )
    sasl_username: str | None = Field(default=None, description="the SASL user")
    sasl_password: SecretStr | None = Field(
        default=None, description="the SASL user's password; prefer the variable to the flag, which shows in ps"
    )
    ssl_cafile: Path | None = Field(
        default=None, description="PEM file of the CA that signed the brokers' certificates"
    )
    ssl_certfile: Path | None = Field(default=None, description="PEM client certificate (mTLS)")
    ssl_keyfile: Path | None = Field(default=None, description="PEM private key of the client certificate (mTLS)")
    ssl_password: SecretStr | None = Field(default=None, description="password of the private key, if it has one")

    @model_validator(mode="after")
    def _coherent(self) -> KafkaSettings:
        sasl = self.security_protocol.startswith("SASL")
        if sasl and not (self.sasl_mechanism and self.sasl_username and self.sasl_password):
            raise ValueError(
                f"security protocol {self.security_protocol} needs ABQ_SASL_MECHANISM, "
                "ABQ_SASL_USERNAME and ABQ_SASL_PASSWORD (or --sasl-* flags)"
            )
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {path} is not a readable file; fix ABQ_{name.upper()}")
        return self

    def client_config(self) -> dict[str, Any]:
        """Keyword arguments for kafka-python's clients; the only place secrets are unwrapped."""
        cfg: dict[str, Any] = {
            "bootstrap_servers": [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()],
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            cfg["sasl_mechanism"] = self.sasl_mechanism
            cfg["sasl_plain_username"] = self.sasl_username
            cfg["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        for ours, theirs in (
            ("ssl_cafile", "ssl_cafile"),
            ("ssl_certfile", "ssl_certfile"),
            ("ssl_keyfile", "ssl_keyfile"),
        ):
            if getattr(self, ours) is not None:
                cfg[theirs] = str(getattr(self, ours))
        if self.ssl_password is not None:
            cfg["ssl_password"] = self.ssl_password.get_secret_value()
        return cfg

    def describe(self) -> str:
        """A log line about the connection, without secrets."""
        auth = f" sasl={self.sasl_mechanism} user={self.sasl_username}" if self.sasl_mechanism else ""
        return f"kafka={self.bootstrap_servers} protocol={self.security_protocol}{auth}"
