"""NodeConfig: environment parsing, precedence, refusal of bad values with a fix, NATS options."""

from __future__ import annotations

import dataclasses
import re
import ssl
from pathlib import Path

import pytest

from node.config import GIB, ConfigError, NodeConfig

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_start_an_embedded_server():
    """The default config needs no flags: embedded NATS, demo model, prefix infer."""
    config = NodeConfig()
    assert config.nats_url is None and config.model is None
    assert config.prefix == "infer" and config.n_slots == 2 and config.bank_ram_bytes == GIB


def test_config_is_frozen():
    """A built config cannot be changed."""
    config = NodeConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.n_slots = 3  # type: ignore[misc]


def test_env_values_are_converted_to_field_types(tmp_path):
    """INFERNODE_* strings become ints, floats, bools, paths and None."""
    env = {
        "INFERNODE_N_SLOTS": "4",
        "INFERNODE_COMMIT_WAIT_S": "2.5",
        "INFERNODE_VERIFY_RESTORE": "no",
        "INFERNODE_BANK_OBJECT_STORE": "TRUE",
        "INFERNODE_DATA_DIR": str(tmp_path),
        "INFERNODE_NATS_URL": "nats://10.0.0.1:4222",
        "INFERNODE_METRICS_PORT": "",
        "INFERNODE_BANK_RAM_BYTES": "0x1000",
        "UNRELATED": "ignored",
    }
    config = NodeConfig.from_env(env)
    assert config.n_slots == 4 and config.commit_wait_s == 2.5
    assert config.verify_restore is False and config.bank_object_store is True
    assert config.data_dir == tmp_path and isinstance(config.data_dir, Path)
    assert config.nats_url == "nats://10.0.0.1:4222"
    assert config.metrics_port is None and config.bank_ram_bytes == 4096


def test_overrides_beat_env_and_none_overrides_are_ignored():
    """An explicit value wins over the environment; a None flag leaves the env value."""
    env = {"INFERNODE_N_SLOTS": "4", "INFERNODE_PREFIX": "team1.infer"}
    config = NodeConfig.from_env(env, n_slots=8, prefix=None)
    assert config.n_slots == 8 and config.prefix == "team1.infer"


def test_string_overrides_are_converted():
    """Overrides given as text are converted like env values."""
    assert NodeConfig.from_env({}, n_ctx="4096").n_ctx == 4096


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"INFERNODE_N_SLOTS": "two"}, "INFERNODE_N_SLOTS='two' is not a whole number"),
        ({"INFERNODE_COMMIT_WAIT_S": "soon"}, "INFERNODE_COMMIT_WAIT_S='soon' is not a number"),
        ({"INFERNODE_VERIFY_RESTORE": "maybe"}, "1, 0, true, false, yes or no"),
        ({"INFERNODE_N_CTX": ""}, "INFERNODE_N_CTX"),
    ],
)
def test_bad_env_values_name_the_variable(env, needle):
    """A value of the wrong type is refused with the variable's name and an example."""
    with pytest.raises(ConfigError, match=re.escape(needle)):
        NodeConfig.from_env(env)


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"n_slots": 0}, "n_slots must be at least 1 (got 0); pass --slots 1 or more"),
        ({"n_ctx": 8}, "pass --ctx 16 or more"),
        ({"threads": -1}, "pass --threads 0 or more"),
        ({"engine": "vllm"}, "engine must be one of auto, llama-cpp, ctransformers"),
        ({"chat_template": "alpaca"}, "pass --chat-template auto"),
        ({"log_level": "loud"}, "log_level must be one of debug, info"),
        ({"log_format": "xml"}, "pass --log-format auto"),
        ({"prefix": "bad prefix"}, "pass --prefix infer"),
        ({"prefix": "a..b"}, "dot-separated tokens"),
        ({"commit_wait_s": 0}, "commit_wait_s must be more than 0 seconds"),
        ({"max_payload": 100 * GIB}, "max_payload must be between"),
        ({"metrics_port": 70000}, "metrics_port must be a port between 0 (any free port) and 65535"),
        ({"nats_url": "http://x:4222"}, "use nats://HOST:4222"),
        ({"nats_user": "alice"}, "nats_user and nats_password go together"),
        ({"model": Path("/no/such/model.gguf")}, "does not exist; fix the path"),
        ({"n_slots": "2"}, "n_slots must be a whole number"),
    ],
)
def test_bad_values_are_refused_with_a_sentence_saying_how_to_fix_them(settings, needle):
    """Each invalid setting raises ConfigError (a ValueError) that says how to fix it."""
    with pytest.raises(ConfigError, match=re.escape(needle)) as info:
        NodeConfig(**settings)
    assert isinstance(info.value, ValueError)


def test_unknown_override_is_refused():
    """A misspelt setting is not silently dropped."""
    with pytest.raises(ConfigError, match="'n_slot' is not a setting"):
        NodeConfig.from_env({}, n_slot=3)


def test_connect_options_reconnect_forever_and_pass_auth_through():
    """Options for nats.connect carry the servers, credentials and reconnect policy."""
    config = NodeConfig(
        nats_url="nats://a:4222, nats://b:4222",
        nats_user="u",
        nats_password="p",
        nats_token="t",
        nats_nkey_seed="SUAEXAMPLESEED",
    )
    options = config.nats_connect_options(name="infernode-test")
    assert options["servers"] == ["nats://a:4222", "nats://b:4222"]
    assert options["max_reconnect_attempts"] == -1 and options["reconnect_time_wait"] == 0.5
    assert options["name"] == "infernode-test"
    assert (options["user"], options["password"], options["token"]) == ("u", "p", "t")
    assert options["nkeys_seed_str"] == "SUAEXAMPLESEED" and "tls" not in options


def test_connect_options_url_argument_overrides_config():
    """The embedded server's URL, known only at run time, replaces nats_url."""
    options = NodeConfig().nats_connect_options("nats://127.0.0.1:5555")
    assert options["servers"] == ["nats://127.0.0.1:5555"]


def test_connect_options_without_any_url_says_how_to_fix_it():
    """With no URL at all the error says to pass --nats-url."""
    with pytest.raises(ConfigError, match="--nats-url"):
        NodeConfig().nats_connect_options()


def test_nkey_seed_file_is_passed_as_a_path(tmp_path):
    """A seed given as a file path is handed to nats-py as a file."""
    seed = tmp_path / "user.nk"
    seed.write_text("SUAEXAMPLESEED\n")
    options = NodeConfig(nats_url="nats://x:4222", nats_nkey_seed=str(seed)).nats_connect_options()
    assert options["nkeys_seed"] == str(seed)


def test_tls_ca_gives_a_verifying_tls_context():
    """A CA bundle yields an SSL context that verifies the server."""
    ca = ssl.get_default_verify_paths().cafile
    if not ca or not Path(ca).is_file():
        pytest.skip("no system CA bundle to use as a test CA")
    options = NodeConfig(nats_url="tls://x:4222", nats_tls_ca=ca).nats_connect_options()
    assert isinstance(options["tls"], ssl.SSLContext)
    assert options["tls"].verify_mode == ssl.CERT_REQUIRED


def test_only_the_config_module_reads_the_environment():
    """No module outside node/config.py (and the CLI entry point handing it in) reads env."""
    allowed = {ROOT / "node" / "config.py", ROOT / "node" / "cli.py"}
    pattern = re.compile(r"os\.environ|os\.getenv|getenv\(")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for package in ("node", "actors", "schemas")
        for path in sorted((ROOT / package).rglob("*.py"))
        if path not in allowed
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, f"environment read outside node/config.py: {offenders}"



def test_a_nats_port_outside_the_port_range_is_refused_with_the_flag_that_fixes_it():
    """--nats-port 70000 is a ConfigError naming the setting and a working value."""
    with pytest.raises(ConfigError, match=r"nats_port .* \(got 70000\); pass --nats-port 4222"):
        NodeConfig(nats_port=70000)
