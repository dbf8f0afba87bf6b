"""The deployment engine's parts, without processes: checkpoints, the federation file, enrolment,
credentials, the bundle allowlist, run keys, and the coordinator's view of replies."""

from __future__ import annotations

import os
import shutil
import stat
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from typer.testing import CliRunner

from spine_fl.cli import app
from spine_fl.client.deployment.clientapp_worker import bundle_refusal
from spine_fl.client.privacy.policy import SitePolicy
from spine_fl.client.site_config import Site
from spine_fl.server.checkpoint import STATE_FILE, Checkpoint, load_checkpoint, retire_checkpoint, save_checkpoint
from spine_fl.server.deployment.enrolment import enrol_public_key
from spine_fl.server.deployment.federation_config import load_federation
from spine_fl.server.grid_watch import WatchingGrid
from spine_fl.server.strategy import RoundLog
from spine_fl.shared.config import ConfigError, RunSettings, run_key_of
from spine_fl.shared.runtime.bundle import build_bundle, project_root
from spine_fl.shared.runtime.credentials import (
    CredentialsError,
    create_server_credentials,
    create_site_keys,
    load_site_public_key,
)


def test_checkpoint_round_trip_and_refusals(tmp_path: Path) -> None:
    settings = RunSettings(rounds=5)
    weights = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, dtype=np.float32)]
    save_checkpoint(tmp_path, settings, Checkpoint(2, weights, {"trained_rounds": [1, 2]}, "a" * 32))
    save_checkpoint(tmp_path, settings, Checkpoint(3, [w + 1 for w in weights], {"trained_rounds": [1, 2, 3]}, "a" * 32))
    assert sorted(p.name for p in tmp_path.glob("weights-*.npz")) == ["weights-round-3.npz"]
    loaded = load_checkpoint(tmp_path, settings)
    assert loaded is not None and loaded.round == 3 and loaded.log["trained_rounds"] == [1, 2, 3]
    assert all(np.array_equal(a, b + 1) for a, b in zip(loaded.weights, weights, strict=True))
    with pytest.raises(ConfigError, match="different \\[run\\] settings"):
        load_checkpoint(tmp_path, RunSettings(rounds=6))
    (tmp_path / "weights-round-3.npz").write_bytes(b"tampered")
    with pytest.raises(ConfigError, match="damaged"):
        load_checkpoint(tmp_path, settings)
    retired = retire_checkpoint(tmp_path, "a" * 32)
    assert retired is not None and (retired / STATE_FILE).exists() and not tmp_path.exists()


def _federation(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "federation.toml"
    path.write_text('[federation]\naddress = "127.0.0.1:9092"\nstate_dir = "s"\nout_dir = "o"\n'
                    'ca_certificate = "c/ca.crt"\ncertificate = "c/server.crt"\nprivate_key = "c/server.key"\n' + body)
    return path


def test_federation_file_errors_name_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="min_sites = 3"):
        load_federation(_federation(tmp_path, "[run]\nmin_sites = 3\n[sites.a]\npublic_key = \"a.pub\"\n"))
    with pytest.raises(ConfigError, match="\\[run\\]: unknown setting\\(s\\) epochs"):
        load_federation(_federation(tmp_path, "[run]\nepochs = 3\n"))
    bad = _federation(tmp_path, "[run]\nmin_sites = 1\n[sites.a]\npublic_key = \"a.pub\"\n")
    bad.write_text(bad.read_text().replace('"127.0.0.1:9092"', '"127.0.0.1"'))
    with pytest.raises(ConfigError, match="expected host:port"):
        load_federation(bad)


def test_enrolment_writes_a_valid_federation_file_and_replaces_a_key(tmp_path: Path) -> None:
    fed = _federation(tmp_path, "[run]\nmin_sites = 1\n")
    keys = create_site_keys(tmp_path / "keys", "leiden")
    assert enrol_public_key(fed, "leiden", keys.public_key) is False
    loaded = load_federation(fed)
    assert loaded.sites["leiden"].resolve() == keys.public_key.resolve()
    new_keys = create_site_keys(tmp_path / "new-keys", "leiden")
    with pytest.raises(ConfigError, match="already enrolled; pass --replace"):
        enrol_public_key(fed, "leiden", new_keys.public_key)  # never silently
    assert load_federation(fed).sites["leiden"].resolve() == keys.public_key.resolve()
    assert enrol_public_key(fed, "leiden", new_keys.public_key, replace=True) is True
    assert load_federation(fed).sites["leiden"].resolve() == new_keys.public_key.resolve()
    assert fed.read_text().count("[sites.leiden]") == 1
    not_a_key = tmp_path / "x.pub"
    not_a_key.write_text("hello")
    with pytest.raises(CredentialsError, match="not an OpenSSH public key"):
        enrol_public_key(fed, "seoul", not_a_key)
    assert "seoul" not in tomllib.loads(fed.read_text())["sites"]


def test_enrolment_keeps_every_comment_and_the_order_of_the_shipped_federation_file(tmp_path: Path) -> None:
    fed = tmp_path / "configs" / "federation.toml"
    fed.parent.mkdir()
    original = (project_root() / "configs" / "federation.toml").read_text()
    fed.write_text(original)
    keys = {site: create_site_keys(tmp_path / "credentials", site).public_key for site in ("leiden", "seoul", "zurich")}
    for site, key in keys.items():
        enrol_public_key(fed, site, key)
    enrol_public_key(fed, "seoul", keys["zurich"], replace=True)  # replaced in place, not added twice
    text = fed.read_text()
    assert text.startswith(original)  # nothing before the new tables moved or changed
    lines = text.splitlines()
    assert [line for line in original.splitlines() if "#" in line] == [line for line in lines if "#" in line]
    assert [line for line in lines if line.startswith("[")] == [
        "[federation]", "[run]                               # the same settings as a simulation scenario's [run]",
        "[sites.leiden]", "[sites.seoul]", "[sites.zurich]"]
    assert tomllib.loads(text)["sites"]["seoul"] == {"public_key": keys["zurich"].as_posix()}
    loaded = load_federation(fed)
    assert loaded.sites == {site: fed.parent / key for site, key in
                            (("leiden", keys["leiden"]), ("seoul", keys["zurich"]), ("zurich", keys["zurich"]))}
    assert loaded.run.min_sites == 3 and loaded.address == "127.0.0.1:9092"


def test_enrolment_refuses_a_file_it_cannot_edit(tmp_path: Path) -> None:
    key = create_site_keys(tmp_path, "leiden").public_key
    fed = tmp_path / "federation.toml"
    fed.write_text("sites = 3\n")
    with pytest.raises(ConfigError, match="`sites` is not a table"):
        enrol_public_key(fed, "leiden", key)
    fed.write_text("[run\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        enrol_public_key(fed, "leiden", key)
    assert fed.read_text() == "[run\n"
    with pytest.raises(ConfigError, match="letters, digits"):
        enrol_public_key(fed, "../leiden", key)


def test_credentials_cover_loopback_and_keep_private_keys_private(tmp_path: Path) -> None:
    made = create_server_credentials(tmp_path, ["coordinator.example.org"])
    cert = x509.load_pem_x509_certificate(made.cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"coordinator.example.org", "localhost"} <= set(names.get_values_for_type(x509.DNSName))
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert stat.S_IMODE(os.stat(made.key).st_mode) == 0o600
    with pytest.raises(CredentialsError, match="refusing to replace"):
        create_server_credentials(tmp_path, ["other"])
    keys = create_site_keys(tmp_path, "leiden")
    assert stat.S_IMODE(os.stat(keys.private_key).st_mode) == 0o600
    assert load_site_public_key(keys.public_key).startswith(b"-----BEGIN PUBLIC KEY-----")


def test_only_allowed_bundles_pass() -> None:
    bundle = build_bundle()
    allowed = Site("leiden", Path("."), Path("."), SitePolicy(allowed_bundles=(bundle.sha256.upper(),)))
    assert bundle_refusal(allowed, bundle.content) is None
    refusal = bundle_refusal(allowed, bundle.content + b"x")
    assert refusal is not None and refusal.rule == "allowed_bundles"
    assert bundle_refusal(Site("leiden", Path("."), Path("."), SitePolicy()), bundle.content) is not None
    with pytest.raises(ValueError, match="64-character"):
        SitePolicy(allowed_bundles=("abc",))


def test_bundle_hash_depends_on_the_code_not_on_where_it_lies(tmp_path: Path) -> None:
    copy = tmp_path / "checkout"
    shutil.copytree(project_root(), copy, ignore=shutil.ignore_patterns(".git", ".venv", "results", "*.egg-info",
                                                                         "__pycache__", "tests"))
    assert build_bundle(copy).sha256 == build_bundle().sha256
    runner = copy / "simulations" / "runner.py"  # research tooling: not in the bundle, so not in its hash
    runner.write_text(runner.read_text() + "\n# changed\n")
    assert build_bundle(copy).sha256 == build_bundle().sha256
    registry = copy / "shared" / "models" / "registry.py"
    registry.write_text(registry.read_text() + "\n# changed\n")
    assert build_bundle(copy).sha256 != build_bundle().sha256


def test_a_run_key_is_never_a_path() -> None:
    assert run_key_of({"run_key": "0123456789abcdef0123456789abcdef"}, "7") == "0123456789abcdef0123456789abcdef"
    for hostile in ("../../etc/passwd", "/tmp/x", "", "ABCDEF" * 6):
        assert run_key_of({"run_key": hostile}, "7") == "7"


class _FakeGrid:
    """Replies for the nodes in `answering`; the others stay silent (a dropout). Each message gets an
    id when sent, as Flower's grids do; `late` holds the ids whose late replies have arrived."""

    def __init__(self, nodes: list[int], answering: set[int], refusing: set[int] = frozenset()):
        self.nodes, self.answering, self.refusing = nodes, answering, refusing
        self.sent: list[list[int]] = []
        self.late: set[str] = set()

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def send_and_receive(self, messages, timeout=None):
        out = []
        self.sent.append([m.metadata.dst_node_id for m in messages])
        for i, m in enumerate(messages):
            m.metadata.message_id = f"m{len(self.sent)}-{i}"
            if m.metadata.dst_node_id in self.answering:
                error = SimpleNamespace(reason='spine-fl-refusal {"rule": "require_dp", "site": "seoul"}') \
                    if m.metadata.dst_node_id in self.refusing else None
                out.append(SimpleNamespace(metadata=SimpleNamespace(src_node_id=m.metadata.dst_node_id, group_id="2",
                                                                    message_type="train"),
                                           has_error=lambda e=error: e is not None, error=error))
        return out

    def pull_messages(self, message_ids):
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i), has_error=lambda: False)
                for i in message_ids if i in self.late]


def _requests(round_: str, nodes=(1, 2, 3)) -> list[SimpleNamespace]:
    return [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n, group_id=round_, message_type="train",
                                                     message_id="")) for n in nodes]


def test_the_coordinator_talks_to_enrolled_nodes_only_and_names_dropouts() -> None:
    log = RoundLog(["leiden", "seoul", "zurich"], 2)
    grid = WatchingGrid(_FakeGrid([1, 2, 3, 99], answering={1, 2}, refusing={2}), log,
                        {1: "leiden", 2: "seoul", 3: "zurich"}, offset=4)
    assert list(grid.get_node_ids()) == [1, 2, 3]
    grid.send_and_receive(_requests("2"))
    assert log.dropouts == [{"round": 6, "site": "zurich", "stage": "train"}]
    assert [(r["round"], r["rule"]) for r in log.refusals] == [(6, "require_dp")]


def test_a_site_that_did_not_answer_is_left_out_until_its_late_reply_arrives() -> None:
    """A connected site that never answers (a hung worker) costs one reply wait, not one per request:
    the next requests skip it (each recorded as its dropout) until its late reply shows it is back."""
    log = RoundLog(["leiden", "seoul", "zurich"], 2)
    fake = _FakeGrid([1, 2, 3], answering={1, 2})
    grid = WatchingGrid(fake, log, {1: "leiden", 2: "seoul", 3: "zurich"}, reply_wait_seconds=20.0)
    grid.send_and_receive(_requests("2"))
    missed = "m1-2"  # zurich's request of round 2
    assert [len(r) for r in (grid.send_and_receive(_requests("3")), grid.send_and_receive(_requests("3")))] == [2, 2]
    assert fake.sent == [[1, 2, 3], [1, 2], [1, 2]]  # not asked again while its request is unanswered
    assert log.dropouts == [{"round": 2, "site": "zurich", "stage": "train"},
                            *[{"round": 3, "site": "zurich", "stage": "train", "unanswered_since_round": 2}] * 2]
    fake.late.add(missed)  # its worker is back and has answered that request
    fake.answering.add(3)
    assert len(grid.send_and_receive(_requests("4"))) == 3
    assert fake.sent[-1] == [1, 2, 3] and len(log.dropouts) == 3


def _site_config(tmp_path: Path, policy: str = "") -> Path:
    path = tmp_path / "leiden.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('[site]\nname = "leiden"\ndata_dir = "data"\nstate_dir = "state"\ntask = "tfesi_radiograph"\n'
                    '[coordinator]\naddress = "127.0.0.1:1"\nca_certificate = "ca.crt"\n'
                    '[identity]\nprivate_key = "leiden_supernode_key"\n[policy]\n' + policy)
    return path


def _one_line(text: str) -> str:
    return " ".join(text.split())


def test_insecure_client_is_refused_unless_the_site_policy_sets_require_tls_false(tmp_path: Path) -> None:
    assert SitePolicy().require_tls is True
    path = _site_config(tmp_path)
    refused = CliRunner().invoke(app, ["client", "--site", "leiden", "--config", str(path), "--insecure"])
    assert refused.exit_code == 1
    text = _one_line(refused.output)
    assert "--insecure refused" in text and "require_tls = false" in text and "[policy]" in text
    assert str(path) in "".join(refused.output.split())  # the site's own config file, named
    assert "WARNING: --insecure" not in text
    assert not (tmp_path / "state").exists()  # nothing started, nothing written
    allowed = CliRunner().invoke(app, ["client", "--site", "leiden", "--config",
                                       str(_site_config(tmp_path / "lab", "require_tls = false\n")), "--insecure"])
    assert "--insecure refused" not in allowed.output
    assert "WARNING: --insecure" in _one_line(allowed.output)
    assert "not joining" in allowed.output  # then it goes on: here, its data folder does not exist


def test_the_server_names_nginx_and_how_to_install_it_when_missing(tmp_path: Path, monkeypatch) -> None:
    import spine_fl.server.deployment.front as front

    fed = _federation(tmp_path, "[run]\nmin_sites = 1\n[sites.a]\npublic_key = \"a.pub\"\n")
    create_server_credentials(tmp_path / "c", [])
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs-here"))
    monkeypatch.setattr(front, "NGINX_LOCATIONS", ())
    result = CliRunner().invoke(app, ["server", "--config", str(fed)])
    assert result.exit_code == 2
    text = _one_line(result.output)
    assert "nginx not found" in text and "apt-get install nginx" in text
    assert not (tmp_path / "s" / "superlink.log").exists()  # nothing was started


def test_the_front_forwards_exactly_the_fleet_api_the_supernode_uses(tmp_path: Path) -> None:
    import inspect
    import re
    import subprocess

    from flwr.supernode.fleet_http_client import FleetHttpClient

    from spine_fl.server.deployment.front import FrontConfig, fleet_paths, nginx_config, write_front_config
    from spine_fl.shared.runtime.coordinator_instance import INSTANCE_PATH

    used = set(re.findall(r'path="(/v1/[^"]+)"', inspect.getsource(FleetHttpClient)))
    assert used and used <= set(fleet_paths()) and all(p.startswith("/v1/fleet/") for p in fleet_paths())
    creds = create_server_credentials(tmp_path / "c", [])
    cfg = FrontConfig("0.0.0.0", 9092, 40000, tmp_path / "front", (creds.ca_cert, creds.cert, creds.key), "a1b2")
    conf = nginx_config(cfg)
    exact = re.findall(r"location = (\S+) \{", conf)
    forwarded = [path for path in exact if path != INSTANCE_PATH]
    assert sorted(forwarded) == fleet_paths() and len(exact) == len(forwarded) + 1
    assert f'location = {INSTANCE_PATH} {{\n            access_log off;\n            return 200 "a1b2";' in conf
    assert re.findall(r"proxy_pass https://superlink(\S+);", conf) == forwarded  # each to its own path only
    assert "/v1/control" not in conf and "/v1/runtime" not in conf
    assert "listen 0.0.0.0:9092 ssl;" in conf and "server 127.0.0.1:40000;" in conf
    assert "proxy_ssl_verify on;" in conf
    insecure = nginx_config(FrontConfig("127.0.0.1", 9092, 40000, tmp_path / "front", None, "a1b2"))
    assert "ssl" not in insecure and "proxy_pass http://superlink/v1/fleet/pull-messages;" in insecure
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(nginx, os.X_OK):
        pytest.skip("nginx not installed (CI installs it: .ci/run)")
    write_front_config(cfg)
    checked = subprocess.run([nginx, "-t", "-p", str(cfg.folder), "-c", str(cfg.conf_path), "-e",
                              str(cfg.log_path)], capture_output=True, text=True, timeout=30, check=False)
    assert checked.returncode == 0, checked.stderr


def test_enrolment_pins_the_sites_ledger_key_and_refuses_a_wrong_file(tmp_path: Path) -> None:
    """Site: `enroll --state-dir` creates its ledger key and copies the public half beside the SuperNode
    key; coordinator: `enroll --federation` pins it beside the SuperNode key."""
    from typer.testing import CliRunner

    from spine_fl.cli import app
    from spine_fl.client.privacy.signed_log import site_key_fingerprint
    from spine_fl.shared.runtime.credentials import ledger_key_fingerprint

    fed = _federation(tmp_path, "[run]\nmin_sites = 1\n")
    keys, state = tmp_path / "keys", tmp_path / "state"
    runner = CliRunner()
    made = runner.invoke(app, ["enroll", "--site", "leiden", "--keys-dir", str(keys), "--state-dir", str(state)])
    assert made.exit_code == 0, made.output
    assert ledger_key_fingerprint(keys / "leiden_ledger_key.pub") == site_key_fingerprint(state)
    enrolled = runner.invoke(app, ["enroll", "--site", "leiden", "--keys-dir", str(keys), "--federation", str(fed)])
    assert enrolled.exit_code == 0 and "ledger key" in enrolled.output, enrolled.output
    assert load_federation(fed).ledger_keys["leiden"].resolve() == (keys / "leiden_ledger_key.pub").resolve()
    wrong = runner.invoke(app, ["enroll", "--site", "seoul", "--public-key", str(keys / "leiden_supernode_key.pub"),
                                "--ledger-key", str(keys / "leiden_supernode_key.pub"), "--federation", str(fed)])
    assert wrong.exit_code == 1 and "not a PEM public key" in wrong.output, wrong.output
    assert "seoul" not in tomllib.loads(fed.read_text())["sites"]


def test_every_problem_of_a_federation_file_is_reported_together(tmp_path: Path) -> None:
    fed = tmp_path / "federation.toml"
    fed.write_text('[federation]\naddress = "nowhere"\nstate_dir = "s"\nout_dir = "o"\nca_certificate = "c"\n'
                   'certificate = "c"\nprivate_key = "k"\n[run]\nrounds = 0\nmin_sites = 3\n'
                   '[sites."../evil"]\npublic_key = "k.pub"\n[sites.seoul]\npublic_key = 7\n[extra]\n')
    with pytest.raises(ConfigError) as caught:
        load_federation(fed)
    text = str(caught.value)
    for expected in ("unknown section(s) extra", "address = 'nowhere': expected host:port", "rounds = 0",
                     '[sites.../evil]: a site name uses letters', "[sites.seoul] public_key = 7",
                     "2 enrolled site(s) but [run] min_sites = 3"):
        assert expected in text, (expected, text)


# --- deployment speed: packed records keep what is sent and checked the same ---


def _message(content, dst: int = 5, message_type: str = "train", src: int = 0):
    import time

    from flwr.app import Message, Metadata

    metadata = Metadata(run_id=1, message_id="", src_node_id=src, dst_node_id=dst, reply_to_message_id="",
                        group_id="3", created_at=time.time(), ttl=3600, message_type=message_type)
    return Message(content=content, metadata=metadata)


def _content():
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    arrays = [np.arange(12, dtype=np.float32).reshape(3, 4), np.array([1, -2, 3], dtype=np.int64),
              np.zeros((0, 3), dtype=np.float64), np.ones((2, 1, 1), dtype=np.uint8)]
    return RecordDict({"fitins.parameters": ArrayRecord(arrays), "fitins.config": ConfigRecord({"a": 1, "b": [b"x"]}),
                       "m": MetricRecord({"x": 1.0}), "single": ArrayRecord([np.ones(2)])})


def _arrays(record) -> list[tuple]:
    return [(key, a.dtype, tuple(a.shape), a.stype, a.data) for key, a in record.items()]


def test_packing_a_message_keeps_every_array_exactly_and_sends_far_fewer_objects() -> None:
    from flwr.app import ConfigRecord, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from spine_fl.shared.runtime.packing import (
        PACKED_KEY,
        PACKED_RECORDS,
        PACKED_STYPE,
        pack_message,
        unpack_message,
    )

    message = _message(_content())
    sent = _arrays(message.content.array_records["fitins.parameters"])
    single = _arrays(message.content.array_records["single"])
    config = dict(message.content.config_records["fitins.config"])
    metrics = dict(message.content.metric_records["m"])
    objects_before = len(get_all_nested_objects(message))
    pack_message(message)
    packed = message.content.array_records["fitins.parameters"]
    assert list(packed.keys()) == [PACKED_KEY] and packed[PACKED_KEY].stype == PACKED_STYPE
    assert _arrays(message.content.array_records["single"]) == single  # one array: nothing to gain
    assert list(message.content.keys()) == ["fitins.parameters", "single", PACKED_RECORDS]
    # arrays: 1 + 2 x 4 objects -> 3; config + metric record -> 1
    assert len(get_all_nested_objects(message)) == objects_before - 2 * (len(sent) - 1) - 1
    unpack_message(message)
    assert list(message.content.keys()) == ["fitins.parameters", "fitins.config", "m", "single"]  # order kept
    assert _arrays(message.content.array_records["fitins.parameters"]) == sent  # names, order, types, bytes
    assert dict(message.content.config_records["fitins.config"]) == config  # bytes, lists, ints as sent
    assert dict(message.content.metric_records["m"]) == metrics
    assert [a.numpy().tolist() for a in message.content.array_records["fitins.parameters"].values()][1] == [1, -2, 3]
    assert unpack_message(message) is message  # nothing packed: unchanged
    one_record = _message(RecordDict({"c": ConfigRecord({"a": 1})}))
    assert list(pack_message(one_record).content.keys()) == ["c"]  # a single record: nothing to gain


def test_a_malformed_packed_record_is_refused_not_guessed_at() -> None:
    import re

    from flwr.app import Array, ArrayRecord, RecordDict

    from spine_fl.client.deployment.clientapp_worker import unpack_refusal
    from spine_fl.shared.runtime.packing import PACKED_KEY, PACKED_STYPE, PackingError, pack_record, unpack_record

    good = pack_record(_content().array_records["fitins.parameters"])[PACKED_KEY].data

    def record(data: bytes) -> ArrayRecord:
        return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)})

    header_len = int.from_bytes(good[:8], "big")
    header, body = good[8:8 + header_len], good[8 + header_len:]
    negative = re.sub(rb'"size":\d+', b'"size":-1', header, count=1)
    for bad, why in [(good[:-1], "past the end"), (good + b"\0", "after the last entry"), (good[:5], "shorter"),
                     ((10**9).to_bytes(8, "big") + good[8:], "beyond the data"),
                     (len(b"{]").to_bytes(8, "big") + b"{]" + body, "unreadable header"),
                     (len(negative).to_bytes(8, "big") + negative + body, "malformed entry")]:
        with pytest.raises(PackingError, match=why):
            unpack_record(record(bad))
    from flwr.app import ConfigRecord, MetricRecord

    from spine_fl.shared.runtime.packing import PACKED_RECORDS, pack_small_records, unpack_small_records

    records = pack_small_records(RecordDict({"c": ConfigRecord({"a": 1}), "m": MetricRecord({"x": 1.0})}))
    framed = records[PACKED_RECORDS]["records"]
    for bad, why in [(ConfigRecord({"records": framed[:-1]}), "past the end"),
                     (ConfigRecord({"records": framed, "more": 1}), "single bytes value"),
                     (ConfigRecord({"records": framed.replace(b'"kind":"metric"', b'"kind":"config"')}),
                      "does not inflate"),
                     (ConfigRecord({"records": framed.replace(b'"order":["c","m"]', b'"order":["c","c"]')}),
                      "order")]:
        with pytest.raises(PackingError, match=why):
            unpack_small_records(RecordDict({PACKED_RECORDS: bad}))
    refusal = unpack_refusal(_message(RecordDict({"p": record(good[:-1])})))
    assert refusal is not None and refusal.rule == "message_format" and "nothing was run" in refusal.message
    assert unpack_refusal(_message(RecordDict({"p": record(good)}))) is None


def test_the_coordinator_packs_what_it_sends_and_unpacks_what_it_receives() -> None:
    from flwr.app import Error, Message, RecordDict

    from spine_fl.shared.runtime.packing import PACKED_KEY, PackingGrid, pack_message

    class Loop:
        seen: list = []

        def send_and_receive(self, messages, timeout=None):
            self.seen = [list(m.content.array_records["fitins.parameters"].keys()) for m in messages]
            return [pack_message(_message(_content(), dst=0)) for _ in messages]

        def get_node_ids(self):
            return [7]

    inner = Loop()
    grid = PackingGrid(inner)
    replies = grid.send_and_receive([_message(_content()), _message(_content(), dst=6)], timeout=1.0)
    assert inner.seen == [[PACKED_KEY], [PACKED_KEY]]
    assert [len(r.content.array_records["fitins.parameters"]) for r in replies] == [4, 4]
    assert grid.get_node_ids() == [7]
    error_reply = Message(metadata=_message(RecordDict()).metadata, error=Error(code=0, reason="refused"))
    assert pack_message(error_reply) is error_reply and error_reply.has_error()



def test_a_reply_that_does_not_unpack_becomes_that_sites_error_not_a_coordinator_crash() -> None:
    from flwr.app import Array, ArrayRecord, RecordDict

    from spine_fl.shared.runtime.packing import PACKED_KEY, PACKED_STYPE, PackingGrid, pack_message

    truncated = Array(dtype="uint8", shape=(3,), stype=PACKED_STYPE, data=b"abc")
    broken = _message(RecordDict({"p": ArrayRecord({PACKED_KEY: truncated})}), dst=0, src=9)

    class Loop:
        def send_and_receive(self, messages, timeout=None):
            return [broken, pack_message(_message(_content(), dst=0, src=8))]

    bad, good = PackingGrid(Loop()).send_and_receive([_message(_content())], timeout=1.0)
    assert bad.has_error() and "could not be unpacked" in bad.error.reason
    assert bad.metadata.src_node_id == 9  # still that site's reply: the run goes on without it
    assert len(good.content.array_records["fitins.parameters"]) == 4


# --- deployment speed: short pull back-off and waits, a task's end that cannot kill the site's worker ---


def test_flower_pull_back_off_is_short_but_as_patient_as_flowers() -> None:
    import time

    from flwr.superlink.grid import http_grid
    from flwr.supernode import start_client_internal

    from spine_fl.shared.runtime import polling

    calls = []
    quick = polling.quick_pulls(lambda *args, **kwargs: calls.append(kwargs))
    quick(["id"], lambda _: b"")
    quick(["id"], lambda _: b"", initial_backoff=2.0)
    assert calls[0] == {"initial_backoff": polling.PULL_INITIAL_BACKOFF, "backoff_cap": polling.PULL_BACKOFF_CAP,
                        "max_tries_per_object": None}  # bounded by Flower's max_time (2 h), not by a count
    assert calls[1]["initial_backoff"] == 2.0
    assert polling.quick_pulls(quick) is quick
    before = (http_grid.pull_objects, http_grid.time, start_client_internal.pull_objects, start_client_internal.time)
    try:
        polling.fast_serverapp_polling()
        polling.fast_supernode_polling()
        polling.fast_supernode_polling()  # idempotent
        for module in (http_grid, start_client_internal):
            assert module.pull_objects._spine_fl_quick and module.pull_objects.__wrapped__ is before[0]
            assert module.time.monotonic() > 0  # the rest of `time` is the real one
        clock = start_client_internal.time  # polls of the SuperLink: 0.1 s (ServerApp: 50 ms); own state: 10 ms
        assert (clock.cap, clock.local_cap, http_grid.time.cap, http_grid.time.local_cap) == (0.1, 0.01, 0.05, None)
        started = time.monotonic()
        http_grid.time.sleep(3)
        start_client_internal.time.sleep(0.5)
        assert time.monotonic() - started < 1.0
    finally:
        http_grid.pull_objects, http_grid.time, start_client_internal.pull_objects, start_client_internal.time = before


def test_a_refused_task_token_fails_the_request_without_ending_the_sites_worker() -> None:
    import httpx

    from spine_fl.shared.runtime.flower import runtime_client

    refused = httpx.HTTPStatusError("401", request=httpx.Request("POST", "http://127.0.0.1:1/x"),
                                    response=httpx.Response(401))
    unavailable = httpx.HTTPStatusError("503", request=refused.request, response=httpx.Response(503))
    worker = runtime_client("127.0.0.1:1", insecure=True, token="t", component="flwr-clientapp",
                            unauthorized_ends_process=False)
    try:
        giveup = worker._retry_invoker.should_giveup
        assert giveup(refused) is True  # Flower's own policy would SIGINT this process here
        assert giveup(unavailable) is False  # everything else as Flower decides (503: retried)
    finally:
        worker.close()


def test_a_task_stops_its_heartbeat_before_it_ends(monkeypatch) -> None:
    from flwr.supercore.heartbeat import HeartbeatSender

    from spine_fl.client.deployment import clientapp_worker
    from spine_fl.shared.runtime.flower import stop_heartbeat

    events: list[str] = []

    class Beat:
        def stop(self):
            events.append("heartbeat stopped")

    monkeypatch.setattr(clientapp_worker, "push_task_output", lambda *args: events.append("task finished"))
    clientapp_worker.finish_task(object(), None, Beat(), "completed", "")  # type: ignore[arg-type]
    assert events == ["heartbeat stopped", "task finished"]

    def failing_beat() -> bool:
        raise RuntimeError("refused")

    ended = HeartbeatSender(failing_beat)
    monkeypatch.setattr("threading.excepthook", lambda args: None)  # the beat's exception ends its thread
    ended.start()
    ended._thread.join(5)
    stop_heartbeat(ended)  # its thread already ended: nothing to stop, nothing raised



def test_a_supernode_left_from_the_coordinators_previous_start_is_refused_by_the_new_one() -> None:
    """A restarted coordinator registers the enrolled keys afresh; a SuperNode still running from its
    previous start signs with its old node id and must be refused by Flower's node authentication
    (HTTP 401), so it cannot take a message of the new run (server/deployment/superlink_process.py)."""
    from base64 import b64encode

    from fastapi import HTTPException
    from flwr.common.constant import TIMESTAMP_HEADER
    from flwr.proto.fleet_pb2 import PullMessagesRequest
    from flwr.proto.node_pb2 import Node
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
    from flwr.supercore.date import now
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes, sign_message
    from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager
    from flwr.superlink.routers.fleet.node_auth import authenticate_node
    from starlette.requests import Request

    from spine_fl.server.deployment.superlink_process import IN_MEMORY_DATABASE

    private, public = generate_key_pairs()
    key = public_key_to_bytes(public)

    def start() -> LinkStateFactory:  # a fresh SuperLink state with the site enrolled, as enrol_sites does
        factory = LinkStateFactory(IN_MEMORY_DATABASE, NoOpFederationManager(), ObjectStoreFactory())
        factory.state().create_node("coordinator", "coordinator", key, 30.0)
        return factory

    def pull(factory: LinkStateFactory, node_id: int) -> None:  # the SuperNode's signed PullMessages
        stamp = now().isoformat()
        headers = {FLEET_HTTP_PUBLIC_KEY_HEADER: b64encode(key).decode(), TIMESTAMP_HEADER: stamp,
                   FLEET_HTTP_SIGNATURE_HEADER: b64encode(sign_message(private, stamp.encode())).decode()}
        request = Request({"type": "http", "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
                           "app": SimpleNamespace(state=SimpleNamespace(linkstate_factory=factory)), "state": {}})
        request.state.protobuf_request = PullMessagesRequest(node=Node(node_id=node_id))
        authenticate_node(request)

    first = start()
    old_id = first.state().get_node_id_by_public_key(key)
    pull(first, old_id)  # accepted by the start that gave it
    restarted = start()
    new_id = restarted.state().get_node_id_by_public_key(key)
    assert new_id not in (None, old_id)
    with pytest.raises(HTTPException) as refused:
        pull(restarted, old_id)
    assert refused.value.status_code == 401
    pull(restarted, new_id)  # a fresh SuperNode, which asked for its id, is served


def _instance_front(served: dict, tls: tuple[Path, Path] | None = None) -> tuple[Any, list[int]]:
    """A stand-in for the coordinator's front on 127.0.0.1: serves `served["id"]` on the instance path
    while `served["up"]`, 403 otherwise, over kept-open connections (HTTP/1.1, as nginx), with TLS
    when `tls` (certificate, key) is given; returns the running server and the client port of every
    request."""
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from spine_fl.shared.runtime.coordinator_instance import INSTANCE_PATH

    client_ports: list[int] = []

    class Front(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            client_ports.append(self.client_address[1])
            up = served["up"] and self.path == INSTANCE_PATH
            body = served["id"].encode() if up else b"refused"
            self.send_response(200 if up else 403)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Front)
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, client_ports


def test_a_site_notices_a_new_start_of_its_coordinator_but_not_a_network_outage(monkeypatch) -> None:
    """The watch behind the SuperNode restart: an id that changes sets `restarted`; a coordinator
    that stops answering for a while and comes back as the same start does not."""
    from spine_fl.client.deployment import site_node
    from spine_fl.client.site_config import SiteConnection
    from spine_fl.shared.runtime.coordinator_instance import fetch_instance, instance_client

    served = {"id": "first", "up": True}
    server, _ = _instance_front(served)
    monkeypatch.setattr(site_node, "WATCH_SECONDS", 0.05)
    address = f"127.0.0.1:{server.server_address[1]}"
    connection = SiteConnection(address, Path("unused-ca.crt"), Path("unused.key"), "outcome")
    try:
        with instance_client(None) as client:
            assert fetch_instance(address, None, client) == "first"
        with site_node.CoordinatorWatch(connection, True) as watch:
            assert watch.known == "first"
            served["up"] = False  # an outage: no id, nothing decided
            assert not watch.restarted.wait(0.5)
            served["up"] = True  # the same start again
            assert not watch.restarted.wait(0.5)
            served["id"] = "second"
            assert watch.restarted.wait(5)
        assert (watch.known, watch.seen) == ("first", "second")
        served["up"] = False
        with site_node.CoordinatorWatch(connection, True) as late:  # id unknown at the SuperNode's start
            assert late.known is None
            served["up"] = True
            assert not late.restarted.wait(0.5) and late.known == "second"
        # the SuperNode exited by itself (the new start refused its old node id) before the watch looked again
        exited = site_node.CoordinatorWatch(connection, True)
        assert not exited.look()  # the same start: an ordinary exit
        served["up"] = False
        assert not exited.look()  # unreachable: nothing decided
        served.update(up=True, id="third")
        assert exited.look() and exited.restarted.is_set() and (exited.known, exited.seen) == ("second", "third")
        exited.close()
        with site_node.CoordinatorWatch(connection, True) as stopped:
            stopped.stop()  # the SuperNode exited: the background asks end, one more look still works
            served["id"] = "fourth"
            assert stopped.look() and stopped.seen == "fourth"
    finally:
        server.shutdown()


def test_the_watch_asks_over_one_kept_open_connection(monkeypatch) -> None:
    """A serving site asks every second: over one connection (HTTP keep-alive), not a new connection
    and TLS handshake each time."""
    from spine_fl.client.deployment import site_node
    from spine_fl.client.site_config import SiteConnection

    server, client_ports = _instance_front({"id": "first", "up": True})
    monkeypatch.setattr(site_node, "WATCH_SECONDS", 0.02)
    connection = SiteConnection(f"127.0.0.1:{server.server_address[1]}", Path("unused-ca.crt"), Path("unused.key"),
                                "outcome")
    try:
        with site_node.CoordinatorWatch(connection, True) as watch:
            deadline = time.monotonic() + 10
            while len(client_ports) < 6 and time.monotonic() < deadline:
                time.sleep(0.02)
        assert watch.known == "first" and not watch.restarted.is_set()
        assert len(client_ports) >= 6 and len(set(client_ports)) == 1, client_ports
    finally:
        server.shutdown()


def test_an_impostor_front_cannot_make_a_site_restart_its_supernode(tmp_path: Path) -> None:
    """An outsider on the network who answers in the coordinator's place with a certificate from
    another CA and a new instance id would make the site drop its SuperNode: the watch's kept-open
    client checks the consortium CA, so the answer is refused and nothing is decided; the real
    coordinator's certificate is accepted over the same path."""
    from spine_fl.client.deployment import site_node
    from spine_fl.client.site_config import SiteConnection
    from spine_fl.shared.runtime.credentials import create_server_credentials

    consortium = create_server_credentials(tmp_path / "consortium", [])
    impostor = create_server_credentials(tmp_path / "impostor", [])
    served = {"id": "first", "up": True}
    real, _ = _instance_front(served, (consortium.cert, consortium.key))
    fake, fake_ports = _instance_front(served, (impostor.cert, impostor.key))
    try:
        for server, expected in ((real, "first"), (fake, None)):
            connection = SiteConnection(f"127.0.0.1:{server.server_address[1]}", consortium.ca_cert,
                                        Path("unused.key"), "outcome")
            watch = site_node.CoordinatorWatch(connection, insecure=False)
            served["id"] = "first"
            assert watch.known == expected
            served["id"] = "second"  # a "new start" announced
            assert watch.look() is (expected is not None) and watch.restarted.is_set() is (expected is not None)
            watch.close()
        assert fake_ports == []  # the handshake failed: no request reached the impostor
    finally:
        real.shutdown()
        fake.shutdown()


def test_a_wake_up_from_another_process_ends_the_wait_at_once(monkeypatch) -> None:
    """shared/runtime/wakeup.py: the SuperNode (or SuperLink) process wakes the waiting worker (or
    ServerApp) through the socket named in its environment; without a wake-up the wait times out."""
    import subprocess
    import sys
    import time

    from flwr.app import ArrayRecord, ConfigRecord, RecordDict
    from flwr.app.message.message import make_message
    from flwr.app.metadata import Metadata
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supernode import start_client_internal
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    from spine_fl.shared.runtime import wakeup

    with wakeup.Wakeup() as wake:
        started = time.monotonic()
        assert not wake.wait(0.2) and time.monotonic() - started >= 0.19
        sender = ("from spine_fl.shared.runtime.wakeup import wake_after\n"
                  "class State:\n    def store(self, stored): return 'id' if stored else None\n"
                  "wake_after(State, 'store')\nState().store(False)\nState().store(True)\n")
        subprocess.run([sys.executable, "-c", sender], env={**os.environ, **wakeup.env_for(wake)}, check=True,
                       timeout=60)
        assert wake.wait(5)  # the call that stored something woke it
        assert not wake.wait(0.1)  # one wake-up, consumed; the call that stored nothing sent none
        # the patch the SuperNode process applies: the worker is woken once the message is whole in the
        # SuperNode's store, not while its parts are still being pulled from the SuperLink
        monkeypatch.setenv(wakeup.ENV, wake.path)
        monkeypatch.setattr(start_client_internal, "_pull_and_store_message",
                            start_client_internal._pull_and_store_message)
        wakeup.wake_after(start_client_internal, "_pull_and_store_message")
        store = ObjectStoreFactory().store()
        state = InMemoryNodeState(store)
        state.store_run(Run.create_empty(7))
        message = make_message(Metadata(7, "", 1, 5, "", "1", time.time(), 3600.0, "train"),
                               RecordDict({"w": ArrayRecord([np.ones(3)]), "c": ConfigRecord({"a": 1})}))
        message.metadata.__dict__["_message_id"] = message.object_id  # as Flower's grid names it
        parts = {oid: o.deflate() for oid, o in get_all_nested_objects(message).items()}
        woken_while_pulling = []

        def pull_object(run_id: int, object_id: str) -> bytes:
            woken_while_pulling.append(wake.wait(0))
            return parts[object_id]

        assert start_client_internal._pull_and_store_message(
            state, store, {}, lambda: (message, get_object_tree(message)), None, None, pull_object,
            lambda *_: None, None) == 7
        assert len(woken_while_pulling) == len(parts) and not any(woken_while_pulling)
        assert wake.wait(5)  # woken after the last part
        assert all(store.get(oid) is not None for oid in parts)
        assert not start_client_internal._pull_and_store_message(state, store, {}, lambda: None, None, None,
                                                                 pull_object, lambda *_: None, None)
        assert not wake.wait(0.1)  # no message pulled: nobody woken
        # the ServerApp's poll for replies: a wait of up to WOKEN_POLL_SECONDS that a wake-up ends
        from spine_fl.shared.runtime.polling import cap_sleeps

        grid_module = SimpleNamespace()
        cap_sleeps(grid_module, 0.05, wake=wake)
        started = time.monotonic()
        grid_module.time.sleep(3)
        waited = time.monotonic() - started
        assert wakeup.WOKEN_POLL_SECONDS - 0.01 <= waited < 2.0  # nobody woke it: the fallback poll
        wakeup._notifier()()  # what the SuperLink sends when it stores a reply
        started = time.monotonic()
        grid_module.time.sleep(3)
        assert time.monotonic() - started < wakeup.WOKEN_POLL_SECONDS / 2
    assert not os.path.exists(wake.path)  # its private folder is gone with it
    assert wakeup.env_for(None) == {}


def test_a_wake_up_folder_left_by_a_killed_process_is_removed_by_the_next_one() -> None:
    """A `spine-fl client` or `server` killed by SIGKILL cannot remove its wake-up folder; the next
    Wakeup made on the machine removes it, and never one whose process still runs."""
    import subprocess
    import sys
    import tempfile

    from spine_fl.shared.runtime import wakeup

    killed = subprocess.Popen([sys.executable, "-c", "from spine_fl.shared.runtime.wakeup import Wakeup\n"
                               "w = Wakeup(); print(w.path, flush=True); import time; time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    left = Path(killed.stdout.readline().strip()).parent
    killed.kill()
    killed.wait(30)
    killed.stdout.close()
    with wakeup.Wakeup() as running:
        assert not left.exists()  # its PID no longer runs: removed
        others = Path(tempfile.gettempdir()) / f"{wakeup.PREFIX}{os.getpid()}-kept"
        others.mkdir()
        try:
            with wakeup.Wakeup():
                assert others.is_dir() and Path(running.path).exists()  # this process still runs: kept
        finally:
            others.rmdir()


def test_flowers_middleware_is_skipped_only_where_it_would_hand_the_request_on(monkeypatch) -> None:
    """shared/runtime/middleware.py: the Control API's layers still act on Control requests (a
    sensitive answer gets no-store) and the sites' authentication on Fleet requests, but neither
    enters the other's; the event log runs only with a plugin, tracing only when on; and Flower's
    SuperLink layers are the ones the skip was written against."""
    from flwr.superlink import main
    from flwr.superlink.routers.control.middlewares import ControlSensitiveResponseMiddleware
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from spine_fl.shared.runtime import middleware

    original = main._get_middleware  # Flower's own: only the SuperLink process replaces it
    assert tuple(m.cls.__name__ for m in original()) == middleware.FLOWER_MIDDLEWARE
    skipped = [m.kwargs["middleware"].__name__ for m in middleware.lean(original()) if m.cls is middleware.OnlyWhere]
    assert sorted(skipped) == sorted(middleware.ONLY_WHERE)

    entered: list[str] = []

    def recording(name: str) -> Middleware:
        async def dispatch(self, request, call_next):
            entered.append(f"{name.removesuffix('Middleware')} {request.url.path.rsplit('/', 1)[1]}")
            return await call_next(request)
        return Middleware(type(name, (BaseHTTPMiddleware,), {"dispatch": dispatch}))

    routes = [Route(path, lambda request: PlainTextResponse("ok"), methods=["POST"])
              for path in ("/v1/control/get-auth-tokens", "/v1/fleet/pull-messages", "/v1/pull-messages")]
    layers = [Middleware(ControlSensitiveResponseMiddleware),
              *map(recording, ["ControlEventLogMiddleware", "RuntimeTracingMiddleware", "NodeAuthMiddleware",
                               "FleetEventLogMiddleware"])]
    server = Starlette(routes=routes, middleware=middleware.lean(layers))
    client = TestClient(server)
    monkeypatch.delenv("FLWR_TRACING_ENABLED", raising=False)
    control = client.post("/v1/control/get-auth-tokens")
    fleet = client.post("/v1/fleet/pull-messages")
    serverapp = client.post("/v1/pull-messages")  # the ServerApp's own API
    assert control.text == fleet.text == serverapp.text == "ok"
    assert control.headers["cache-control"] == "no-store" and "cache-control" not in fleet.headers
    assert entered == ["ControlEventLog get-auth-tokens", "NodeAuth pull-messages"]
    entered.clear()
    monkeypatch.setenv("FLWR_TRACING_ENABLED", "1")
    server.state.fleet_event_log_plugin = object()
    client.post("/v1/fleet/pull-messages")
    assert entered == ["RuntimeTracing pull-messages", "NodeAuth pull-messages", "FleetEventLog pull-messages"]


def test_the_superlink_and_supernode_processes_patch_flowers_app_builders(monkeypatch) -> None:
    """What superlink_process.py and supernode_process.py call before Flower builds its apps: the
    names Flower's create_app reads at call time now give the lean layers (restored after the test)."""
    from flwr.superlink import main as superlink
    from flwr.supernode import main as supernode

    from spine_fl.shared.runtime import middleware

    monkeypatch.setattr(superlink, "_get_middleware", superlink._get_middleware)
    monkeypatch.setattr(supernode, "RuntimeTracingMiddleware", supernode.RuntimeTracingMiddleware)
    for _ in range(2):  # applied twice, wrapped once
        middleware.lean_superlink_middleware()
        middleware.lean_supernode_middleware()
    layers = superlink._get_middleware()
    assert len(layers) == len(middleware.FLOWER_MIDDLEWARE)
    assert sum(m.cls is middleware.OnlyWhere for m in layers) == len(middleware.ONLY_WHERE)
    assert supernode.RuntimeTracingMiddleware.func is middleware.OnlyWhere
    assert supernode.RuntimeTracingMiddleware.keywords["middleware"].__name__ == "RuntimeTracingMiddleware"


def test_loopback_ports_stay_clear_of_the_os_outgoing_range_and_rays_fixed_ports() -> None:
    """A chosen port inside the OS's outgoing range can be taken by any connection before the server
    binds it (an nginx start failed so); one inside Ray's worker range (10002-19999) made a Ray
    head refuse to start. Each pick is between the two, and bindable."""
    import socket

    from spine_fl.shared.runtime.processes import LOWEST_PORT, _outgoing_ports_start, free_loopback_port

    top = _outgoing_ports_start()
    if top <= LOWEST_PORT + 1000:
        pytest.skip(f"this machine's outgoing range starts at {top}: no room below it")
    for _ in range(50):
        port = free_loopback_port()
        assert LOWEST_PORT <= port < top
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
