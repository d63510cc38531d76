"""`raydistill cluster check`: the shipped cluster files pass with a warning per placeholder still to fill in, broken
ones fail with the line that names the problem; the command's exit code is the worst file's.

Launcher YAMLs go through the installed Ray's own prepare_config + validate_config, offline; no Ray is started.
"""
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raydistill.cli import main as cli
from raydistill.cluster import check_cluster_file, main_check, placeholder_warnings

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = sorted((ROOT / "clusters").glob("*.yaml"))
BROKEN = ROOT / "tests" / "data" / "broken_clusters"

TOKEN_LINE = ("`ray start` without token authentication; prefix it with RAY_AUTH_MODE=token "
              "(the token is read from ~/.ray/auth_token)")
DASHBOARD_LINE = ("--dashboard-host=0.0.0.0 exposes the dashboard (8265) on every interface; "
                  "use --dashboard-host=127.0.0.1 and reach it over SSH (ray dashboard FILE)")
INSTALL_LINE = ("no command installs raydistill (pip install ... raydistill); "
                "the driver and every peer actor import it")

# Each broken file and exactly the problems the checker must report for it.
EXPECTED = {
    "aws_fractional_gpu.yaml": [
        "available_node_types.gpu.resources.GPU: 0.5: a node offers whole GPUs (0, 1, 2, ...); "
        "peers share a GPU through gpus_per_peer in the raydistill config",
    ],
    "unknown_key.yaml": ["setup_comands: unknown top-level key; did you mean 'setup_commands'?"],
    "local_node_types.yaml": [
        "available_node_types: The field available_node_types is not supported for on-premise clusters.",
    ],
    "dashboard_public.yaml": [f"head_start_ray_commands: {DASHBOARD_LINE}"],
    "missing_raydistill.yaml": [f"head_setup_commands: {INSTALL_LINE}", f"worker_setup_commands: {INSTALL_LINE}"],
    "no_token_auth.yaml": [f"worker_start_ray_commands: {TOKEN_LINE}"],
    "aws_default_start.yaml": [
        f"head_start_ray_commands: {TOKEN_LINE} (Ray's default for provider aws; write your own)",
        f"head_start_ray_commands: {DASHBOARD_LINE} (Ray's default for provider aws; write your own)",
        f"worker_start_ray_commands: {TOKEN_LINE} (Ray's default for provider aws; write your own)",
    ],
    "aws_open_ports.yaml": [
        "available_node_types.head.node_config.SecurityGroupIds: missing: Ray would create a security group that "
        "opens SSH to 0.0.0.0/0; name your own group (SSH from your CIDR only, all traffic within the group)",
        "provider.security_group.IpPermissions[0]: opens port 8265 (dashboard) to the internet; "
        "reach it over SSH instead",
    ],
    "gcp_gpu_mismatch.yaml": [
        "available_node_types.gpu.resources.GPU: 1, but guestAccelerators attach 4; "
        "the autoscaler launches nodes by the resources declared here",
    ],
    "ray_version_mismatch.yaml": [
        "head_setup_commands: installs Ray 2.59.0, but this Ray is 2.60.0; pin ray==2.60.0",
        "worker_setup_commands: installs Ray 2.59.0, but this Ray is 2.60.0; pin ray==2.60.0",
    ],
    "kuberay_fractional_gpu.yaml": [
        "spec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.nvidia.com/gpu: '0.5': "
        "Kubernetes gives a pod whole GPUs; peers share a GPU through gpus_per_peer in the raydistill config",
    ],
    "kuberay_exposed.yaml": [
        "spec.authOptions.mode: token authentication is off; set spec.authOptions.mode: token (KubeRay 1.5.1+), "
        "or give every Ray container RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from a Secret",
        "spec.headGroupSpec.serviceType: LoadBalancer exposes GCS (6379) and the dashboard (8265) outside the "
        "cluster; use ClusterIP and kubectl port-forward",
        "spec.headGroupSpec.rayStartParams.dashboard-host: '0.0.0.0' exposes the dashboard on every interface; "
        "use '127.0.0.1' and kubectl port-forward",
    ],
    "kuberay_structure.yaml": [
        "apiVersion: 'ray.io/v1alpha1': a RayCluster is ray.io/v1",
        "spec.headGroupSpec: missing: a RayCluster needs a head group",
        "spec.workerGroupSpecs[0].groupName: missing: every worker group has a name",
    ],
}


def test_the_shipped_cluster_files_are_all_here():
    assert [p.name for p in CLUSTERS] == ["aws-gpu.yaml", "gcp-gpu.yaml", "kuberay-raycluster.yaml", "onprem.yaml"]


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_every_shipped_cluster_file_passes(path):
    assert check_cluster_file(path) == []


@pytest.mark.parametrize("path", [p for p in CLUSTERS if p.name != "kuberay-raycluster.yaml"], ids=lambda p: p.name)
def test_shipped_launcher_files_pass_rays_own_validation(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load(path.read_text())))  # raises on a bad file


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_shipped_files_pin_ray_2_60_0_and_raydistill_0_1_0(path):
    config = yaml.safe_load(path.read_text())
    if config.get("kind") == "RayCluster":
        spec = config["spec"]
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        assert spec["rayVersion"] == "2.60.0"
        assert {c["image"] for g in groups for c in g["template"]["spec"]["containers"]} == {
            "registry.example.com/raydistill:0.1.0"}
        dockerfile = (ROOT / "clusters" / "Dockerfile").read_text()
        assert "FROM rayproject/ray:2.60.0-" in dockerfile
        assert '"ray[default,train,tune]==2.60.0" /tmp/raydistill-0.1.0-py3-none-any.whl' in dockerfile
    else:
        assert 'pip install "ray[default,train,tune]==2.60.0" ~/raydistill-dist/raydistill-0.1.0-py3-none-any.whl' in \
            config["setup_commands"]


def test_every_broken_file_has_an_expectation():
    assert sorted(p.name for p in BROKEN.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_broken_file_fails_with_the_expected_lines(name):
    assert check_cluster_file(BROKEN / name) == EXPECTED[name]


def test_ray_itself_rejects_the_fractional_gpu_and_the_local_node_types():
    """The checker's lines for these two restate what Ray 2.60 rejects at `ray up`, not a rule of its own."""
    import click
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    with pytest.raises(jsonschema.ValidationError, match="0.5 is not of type 'integer'"):
        validate_config(prepare_config(yaml.safe_load((BROKEN / "aws_fractional_gpu.yaml").read_text())))
    with pytest.raises(click.ClickException, match="available_node_types is not supported"):
        prepare_config(yaml.safe_load((BROKEN / "local_node_types.yaml").read_text()))


def _write(tmp_path, config, name="cluster.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config) if not isinstance(config, str) else config)
    return path


def _onprem():
    return yaml.safe_load((ROOT / "clusters" / "onprem.yaml").read_text())


def test_rays_schema_errors_come_through_as_one_line(tmp_path):
    config = _onprem()
    config["max_workers"] = "three"
    assert check_cluster_file(_write(tmp_path, config)) == [
        "max_workers: 'three' is not of type 'integer' (Ray's cluster schema)"]


def test_rays_cross_field_rules_come_through(tmp_path):
    config = yaml.safe_load((ROOT / "clusters" / "aws-gpu.yaml").read_text())
    config["head_node_type"] = "head.gpu"
    assert check_cluster_file(_write(tmp_path, config)) == [
        "head_node_type: `head_node_type` must be one of `available_node_types`."]


def test_unreadable_files_are_one_problem(tmp_path):
    assert check_cluster_file(tmp_path / "absent.yaml") == ["file: cannot read it: No such file or directory"]
    assert check_cluster_file(_write(tmp_path, "- a\n- list\n")) == [
        "file: a cluster file is a YAML mapping (a Ray cluster-launcher config or a KubeRay RayCluster)"]
    assert check_cluster_file(_write(tmp_path, "provider: {type: [local\n"))[0].startswith("file: not valid YAML: ")
    assert check_cluster_file(_write(tmp_path, {"cluster_name": "x"})) == [
        "provider.type: missing: every cluster-launcher file names its provider (local, aws, gcp, ...)"]


def test_an_unknown_provider_is_reported_in_rays_words(tmp_path):
    config = _onprem()
    config["provider"] = {"type": "mainframe"}
    assert check_cluster_file(_write(tmp_path, config)) == ["config: Unsupported node provider: mainframe"]


def test_a_dashboard_bound_to_all_ipv6_interfaces_is_caught(tmp_path):
    config = _onprem()
    config["head_start_ray_commands"][1] = config["head_start_ray_commands"][1].replace(
        "--dashboard-host=127.0.0.1", "--dashboard-host ::")
    problems = check_cluster_file(_write(tmp_path, config))
    assert problems == [problems[0]] and problems[0].startswith("head_start_ray_commands: --dashboard-host=:: exposes")


def test_a_node_types_own_setup_list_must_install_raydistill_too(tmp_path):
    config = yaml.safe_load((ROOT / "clusters" / "aws-gpu.yaml").read_text())
    config["available_node_types"]["worker.gpu8"]["worker_setup_commands"] = ["nvidia-smi"]
    assert check_cluster_file(_write(tmp_path, config)) == [
        f"available_node_types.worker.gpu8.worker_setup_commands: {INSTALL_LINE}"]


def test_main_check_prints_ok_or_one_line_per_problem(tmp_path, capsys):
    filled = filled_in_aws(tmp_path)
    assert main_check(filled) == 0
    assert capsys.readouterr().out == f"ok: {filled} (provider aws, 3 node types, 8 GPUs max per node)\n"
    broken = BROKEN / "missing_raydistill.yaml"
    assert main_check(broken) == 1
    problems = [line for line in capsys.readouterr().out.splitlines() if ": warning: " not in line]
    assert problems == [f"{broken}: {line}" for line in EXPECTED[broken.name]]


def test_summaries_of_the_other_shipped_files(capsys):
    for name in ("onprem.yaml", "gcp-gpu.yaml", "kuberay-raycluster.yaml"):
        main_check(ROOT / "clusters" / name)
    oks = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ok: ")]
    assert [line.split(" (", 1)[1] for line in oks] == [
        "provider local, 3 hosts, GPUs detected by Ray on each host); 3 placeholders to fill in",
        "provider gcp, 3 node types, 4 GPUs max per node); 1 placeholder to fill in",
        "KubeRay RayCluster, 3 groups, 8 GPUs max per pod); 3 placeholders to fill in",
    ]


# ---- placeholders: a warning naming the key path and the value; the exit code stays 0 ---------------------------
AWS_EXAMPLE_IDS = {"ImageId": "ami-0123456789abcdef0", "SecurityGroupIds[0]": "sg-0123456789abcdef0",
                   "SubnetIds[0]": "subnet-0123456789abcdef0"}
# ids of the shape AWS hands out (17 random hex digits), as a user fills them in
AWS_REAL_LOOKING_IDS = {"ami-0123456789abcdef0": "ami-0b5e7c1f9d3a8e2c4",
                        "sg-0123456789abcdef0": "sg-07f3c9e1a5b2d8e46",
                        "subnet-0123456789abcdef0": "subnet-0c4e8a2f6b1d9e3a7"}


def filled_in_aws(tmp_path):
    """The shipped AWS file with its three placeholders replaced, as a user would edit it."""
    text = (ROOT / "clusters" / "aws-gpu.yaml").read_text()
    for placeholder, value in AWS_REAL_LOOKING_IDS.items():
        assert placeholder in text
        text = text.replace(placeholder, value)
    return _write(tmp_path, text, "aws-filled.yaml")


def warned(path) -> list[tuple[str, str]]:
    """(field, quoted value) of each placeholder warning."""
    return [re.match(r"(\S+): ('[^']*')", line).groups() for line in placeholder_warnings(path)]


def test_every_shipped_placeholder_is_named_with_its_key_path_and_value():
    aws_nodes = ("head.cpu", "worker.gpu1", "worker.gpu8")
    assert warned(ROOT / "clusters" / "aws-gpu.yaml") == [
        (f"available_node_types.{node}.node_config.{key}", repr(value))
        for node in aws_nodes for key, value in AWS_EXAMPLE_IDS.items()]
    assert warned(ROOT / "clusters" / "gcp-gpu.yaml") == [("provider.project_id", "'my-gcp-project'")]
    assert warned(ROOT / "clusters" / "onprem.yaml") == [
        ("provider.head_ip", "'192.0.2.10'"), ("provider.worker_ips[0]", "'192.0.2.11'"),
        ("provider.worker_ips[1]", "'192.0.2.12'")]
    image = "'registry.example.com/raydistill:0.1.0'"
    assert warned(ROOT / "clusters" / "kuberay-raycluster.yaml") == [
        (f"spec.{group}.template.spec.containers[0].image", image)
        for group in ("headGroupSpec", "workerGroupSpecs[0]", "workerGroupSpecs[1]")]


def test_cli_exit_code_is_0_for_good_and_placeholder_files_1_for_broken_ones_and_the_worst_of_several(
        tmp_path, capsys):
    good, shipped, broken = filled_in_aws(tmp_path), ROOT / "clusters" / "aws-gpu.yaml", BROKEN / "no_token_auth.yaml"
    assert cli(["cluster", "check", str(good)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"ok: {good} (provider aws, 3 node types, 8 GPUs max per node)"]

    assert cli(["cluster", "check", str(shipped)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"ok: {shipped} (provider aws, 3 node types, 8 GPUs max per node); 9 placeholders to fill in"
    assert lines[0] == (f"{shipped}: warning: available_node_types.head.cpu.node_config.ImageId: "
                        "'ami-0123456789abcdef0' is a placeholder (an example id from AWS's documentation); "
                        "put your AMI id here")
    assert len(lines) == 10 and all(line.startswith(f"{shipped}: warning: ") for line in lines[:-1])

    assert cli(["cluster", "check", str(broken)]) == 1
    assert f"{broken}: worker_start_ray_commands: {TOKEN_LINE}" in capsys.readouterr().out.splitlines()

    assert cli(["cluster", "check", str(good), str(shipped)]) == 0
    assert cli(["cluster", "check", str(good), str(broken), str(shipped)]) == 1
    out = capsys.readouterr().out
    assert f"ok: {good} " in out and f"ok: {shipped} " in out and f"ok: {broken}" not in out  # every file is checked


@pytest.mark.parametrize("field, value, placeholder", [
    ("ImageId", "ami-0123456789abcdef0", True),            # AWS's documentation ids: runs of hex digits
    ("ImageId", "ami-0abcdef1234567890", True),
    ("SecurityGroupIds", ["sg-12345678"], True),
    ("SubnetIds", ["subnet-ffffffff"], True),
    ("SecurityGroupIds", ["SG_ID"], True),                # not an id at all: the header's own name for it
    ("ImageId", "ami-<your AMI>", True),
    ("ImageId", "ami-0b5e7c1f9d3a8e2c4", False),           # ids of the shape AWS hands out
    ("SecurityGroupIds", ["sg-4f9a2c1e"], False),
    ("ImageId", "latest_dlami", False),                    # Ray's own keyword for its default AMI
    ("IamInstanceProfile", {"Arn": "arn:aws:iam::123456789012:instance-profile/ray"}, True),
    ("IamInstanceProfile", {"Arn": "arn:aws:iam::480913275561:instance-profile/ray"}, False),
])
def test_aws_placeholder_rules(tmp_path, field, value, placeholder):
    config = yaml.safe_load(filled_in_aws(tmp_path).read_text())
    config["available_node_types"]["worker.gpu1"]["node_config"][field] = value
    path = _write(tmp_path, config)
    assert check_cluster_file(path) == []
    expected_field = f"available_node_types.worker.gpu1.node_config.{field}"
    expected_field += {"SecurityGroupIds": "[0]", "SubnetIds": "[0]", "IamInstanceProfile": ".Arn"}.get(field, "")
    quoted = repr(value["Arn"] if isinstance(value, dict) else value[0] if isinstance(value, list) else value)
    assert warned(path) == ([(expected_field, quoted)] if placeholder else [])


@pytest.mark.parametrize("project, placeholder", [
    ("my-gcp-project", True), ("your-project-id", True), ("PROJECT_ID", True), ("example-ml", True),
    ("acme-ml-training", False), ("rd-prod-4512", False)])
def test_gcp_project_placeholder_rules(tmp_path, project, placeholder):
    config = yaml.safe_load((ROOT / "clusters" / "gcp-gpu.yaml").read_text())
    config["provider"]["project_id"] = project
    path = _write(tmp_path, config)
    assert check_cluster_file(path) == []
    assert warned(path) == ([("provider.project_id", repr(project))] if placeholder else [])


def test_gcp_resource_paths_naming_a_placeholder_project_are_warned(tmp_path):
    config = yaml.safe_load((ROOT / "clusters" / "gcp-gpu.yaml").read_text())
    config["provider"]["project_id"] = "acme-ml-training"
    config["available_node_types"]["worker_gpu1"]["node_config"]["disks"] = [{
        "boot": True, "initializeParams": {"sourceImage": "projects/my-project/global/images/ray-gpu"}}]
    assert warned(_write(tmp_path, config)) == [
        ("available_node_types.worker_gpu1.node_config.disks[0].initializeParams.sourceImage",
         "'projects/my-project/global/images/ray-gpu'")]   # the shipped deeplearning-platform-release image passes


@pytest.mark.parametrize("host, placeholder", [
    ("198.51.100.7", True), ("203.0.113.250", True), ("2001:db8::5", True), ("gpu1.example.com", True),
    ("<worker ip>", True), ("10.0.3.17", False), ("gpu1.lab.internal", False), ("fd00::17", False)])
def test_onprem_host_placeholder_rules(tmp_path, host, placeholder):
    config = _onprem()
    config["provider"]["head_ip"], config["provider"]["worker_ips"] = "10.0.3.16", ["10.0.3.18", host]
    path = _write(tmp_path, config)
    assert check_cluster_file(path) == []
    assert warned(path) == ([("provider.worker_ips[1]", repr(host))] if placeholder else [])


def test_kuberay_images_from_a_real_registry_are_not_placeholders(tmp_path):
    text = (ROOT / "clusters" / "kuberay-raycluster.yaml").read_text()
    path = _write(tmp_path, text.replace("registry.example.com/", "ghcr.io/acme/"), "kuberay.yaml")
    assert check_cluster_file(path) == [] and placeholder_warnings(path) == []


def test_the_check_never_opens_a_connection(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the cluster check tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for path in CLUSTERS:
        assert check_cluster_file(path) == []


def test_the_check_imports_no_cloud_provider_code():
    """boto3 and googleapiclient are not installed; Ray's AWS/GCP provider modules must stay unimported."""
    script = (
        "import sys\n"
        "from raydistill.cluster import check_cluster_file\n"
        f"assert check_cluster_file({str(ROOT / 'clusters' / 'aws-gpu.yaml')!r}) == []\n"
        f"assert check_cluster_file({str(ROOT / 'clusters' / 'gcp-gpu.yaml')!r}) == []\n"
        "prefixes = ('boto3', 'botocore', 'googleapiclient', 'ray.autoscaler._private.aws',"
        " 'ray.autoscaler._private.gcp')\n"
        "print(sorted(m for m in sys.modules if m.startswith(prefixes)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         timeout=120).stdout
    assert out.strip() == "[]"


def test_security_group_rules_that_open_ray_ports_to_the_internet(tmp_path):
    config = yaml.safe_load((BROKEN / "aws_open_ports.yaml").read_text())
    config["provider"]["security_group"]["IpPermissions"] = [
        {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},                       # everything
        {"IpProtocol": "tcp", "FromPort": 6000, "ToPort": 7000, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
        {"IpProtocol": "tcp", "FromPort": 6379, "ToPort": 6379, "IpRanges": [{"CidrIp": "10.0.0.0/16"}]},
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
    ]
    opened = [line for line in check_cluster_file(_write(tmp_path, config)) if line.startswith("provider.")]
    assert opened == [
        "provider.security_group.IpPermissions[0]: opens port 6379 (GCS) to the internet; reach it over SSH instead",
        "provider.security_group.IpPermissions[0]: opens port 8265 (dashboard) to the internet; "
        "reach it over SSH instead",
        "provider.security_group.IpPermissions[1]: opens port 6379 (GCS) to the internet; reach it over SSH instead",
    ]


def test_the_readme_cluster_commands_name_shipped_files_and_their_shared_storage():
    """The README's cluster section uses the files under clusters/ and the shared mount those files set up."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    section = readme[readme.index("## Running on a cluster"):]
    named = set(re.findall(r"clusters/[\w.-]+\.yaml", section))
    assert named and all((root / name).is_file() for name in named)
    for name in named:
        assert check_cluster_file(root / name) == [], name
        assert "/shared" in (root / name).read_text()
    outputs = re.findall(r"--output (\S+)", section)
    assert outputs and all(out.startswith("/shared/") for out in outputs)
