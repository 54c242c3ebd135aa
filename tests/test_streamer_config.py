"""Config of the HTTP server, the sources and the Data Streamer ingress: parsed once, with
file:line errors, and the stream's secret only ever as a `${NAME}` reference."""

from __future__ import annotations

import textwrap

import pytest

from engine import secrets, sources
from engine.config import load_config
from engine.errors import ConfigError
from engine.sources.streamer import secret_of


def _config(tmp_path, text: str):
    path = tmp_path / "engine.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return load_config(path)


def test_by_default_the_poller_runs_and_the_http_server_listens_on_loopback_8080():
    config = load_config(None)
    assert config.sources == ("poller",)
    assert (config.http.enabled, config.http.host, config.http.port) == (True, "127.0.0.1", 8080)
    assert config.source_settings["data_streamer"].secret_reference is None
    sources.check(config.sources, config.source_settings)  # nothing to resolve


def test_a_full_service_config_is_read_and_the_secret_resolved_from_the_environment(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("STREAMER_SECRET", "a-long-random-stream-secret")
    config = _config(
        tmp_path,
        """
        sources: [poller, data_streamer]
        http: {enabled: true, host: 0.0.0.0, port: 9090}
        data_streamer:
          auth_header: Authorization
          secret: ${STREAMER_SECRET}
          max_body_bytes: 4096
        """,
    )
    assert config.sources == ("poller", "data_streamer")
    assert (config.http.host, config.http.port) == ("0.0.0.0", 9090)
    streamer = config.source_settings["data_streamer"]
    assert streamer.auth_header == "Authorization"
    assert streamer.max_body_bytes == 4096
    assert secret_of(streamer) == "a-long-random-stream-secret"
    assert "a-long-random-stream-secret" not in secrets.redact("got a-long-random-stream-secret")


@pytest.mark.parametrize(
    ("text", "line", "says"),
    [
        ("sources: [poller, data_streamr]\n", 1, "did you mean `data_streamer`"),
        ("sources: []\n", 1, "must be a list of sources"),
        (
            "sources: [data_streamer]\n",
            1,
            "the data_streamer source needs `data_streamer.secret`",
        ),
        (
            "data_streamer:\n  secret: hunter2-but-longer\n",
            2,
            "must reference an environment variable, not hold the secret itself",
        ),
        ("data_streamer:\n  auth_header: 'X-Secret: x'\n", 2, "must be an HTTP header name"),
        ("data_streamer:\n  max_body_bytes: 10\n", 2, "whole number of at least 1,024"),
        ("http:\n  port: 70000\n", 2, "port number ≤ 65535"),
        ("http:\n  prot: 8080\n", 2, "did you mean `port`"),
        (
            "sources: [data_streamer]\nhttp: {enabled: false}\ndata_streamer: {secret: '${S}'}\n",
            2,
            "needs the HTTP server",
        ),
    ],
)
def test_service_config_mistakes_are_reported_with_file_and_line(tmp_path, text, line, says):
    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, text)
    assert str(caught.value).startswith(f"{tmp_path / 'engine.yaml'}:{line}: ")
    assert says in str(caught.value)


def test_an_unset_secret_variable_is_named_when_the_secret_is_needed(tmp_path, monkeypatch):
    monkeypatch.delenv("STREAMER_SECRET", raising=False)
    monkeypatch.delenv("STREAMER_SECRET_FILE", raising=False)
    config = _config(
        tmp_path, "sources: [data_streamer]\ndata_streamer: {secret: '${STREAMER_SECRET}'}\n"
    )
    with pytest.raises(ConfigError, match="STREAMER_SECRET"):
        sources.check(config.sources, config.source_settings)


def test_the_secret_is_not_asked_for_when_the_stream_is_not_a_source(tmp_path, monkeypatch):
    monkeypatch.delenv("STREAMER_SECRET", raising=False)
    monkeypatch.delenv("STREAMER_SECRET_FILE", raising=False)
    config = _config(tmp_path, "sources: [poller]\ndata_streamer: {secret: '${STREAMER_SECRET}'}\n")
    sources.check(config.sources, config.source_settings)  # not resolved: no error
