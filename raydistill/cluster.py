"""Offline check of a cluster file before `ray up` or `kubectl apply`.

A Ray cluster-launcher YAML is validated the way the installed Ray validates it at `ray up`: Ray's own
`prepare_config` (provider defaults merged in, the on-premises node type built) then `validate_config` (Ray's JSON
schema and its cross-field rules). Neither touches the network or imports a cloud SDK: the provider modules that need
boto3 or googleapiclient (resource autofill, bootstrap) run only after them in `ray up`, so they are left out.
A KubeRay `RayCluster` manifest has no validator in Ray; its structure is checked here.

On top, raydistill's own rules: whole GPUs per node type, raydistill installed on the nodes, Ray pinned to the version
installed here, token authentication on every `ray start`, and the dashboard (8265) and GCS (6379) kept off the public
internet.

Apart from problems, the check warns about placeholders: values that only stand in for the user's own (AWS's
documentation ids, example GCP project ids, documentation addresses and domains). Ray accepts them offline and
`ray up` fails on them later, in the cloud; they are warnings, so the shipped files check with exit 0.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import io
import ipaddress
import json
import logging
import re
from pathlib import Path

import yaml

# A problem is (field, message); printed as "<path>: <field>: <message>". A placeholder warning has the same shape.
Problem = tuple[str, str]

_RAY_START = re.compile(r"\bray\s+start\b")
_TOKEN_AUTH = re.compile(r"\bRAY_AUTH_MODE=[\"']?token\b")
_DASHBOARD_HOST = re.compile(r"--dashboard-host(?:=|\s+)[\"']?([^\s\"';]+)")
_INSTALLS_RAYDISTILL = re.compile(r"\bpip3?\s+install\b[^;&|]*raydistill")
_RAY_PIN = re.compile(r"(?<![\w.-])ray(?:\[[^\]]*\])?==([0-9][\w.]*)")
_RAY_IMAGE_TAG = re.compile(r"^rayproject/ray(?:-ml)?:([0-9]+\.[0-9]+\.[0-9]+)")
_ALL_INTERFACES = {"0.0.0.0", "::", "[::]", "*"}
_PUBLIC_CIDRS = {"0.0.0.0/0", "::/0"}
_RAY_PORTS = {6379: "GCS", 8265: "dashboard"}
_GPU_RESOURCE_K8S = "nvidia.com/gpu"
_KUBERAY_API = "ray.io/v1"


@dataclasses.dataclass
class Report:
    """What the check found in one file."""

    problems: list[Problem]       # the file fails at `ray up` / `kubectl apply`, or breaks a rule of raydistill's
    placeholders: list[Problem]   # values still to fill in; a warning, not a failure
    summary: str = ""


def check_cluster_file(path) -> list[str]:
    """Problems of a cluster file as "<field>: <problem>" lines; an empty list means it is fine."""
    return [f"{field}: {message}" for field, message in _inspect(path).problems]


def placeholder_warnings(path) -> list[str]:
    """Placeholders of a cluster file as "<field>: <warning>" lines (values only the user can fill in)."""
    return [f"{field}: {message}" for field, message in _inspect(path).placeholders]


def main_check(path) -> int:
    """`raydistill cluster check FILE`: one line per problem and per placeholder, then "ok" when there is no problem;
    1 when there is a problem, else 0 (placeholders only warn)."""
    report = _inspect(path)
    for field, message in report.problems:
        print(f"{path}: {field}: {message}")
    for field, message in report.placeholders:
        print(f"{path}: warning: {field}: {message}")
    if report.problems:
        return 1
    count = len(report.placeholders)
    todo = f"; {count} placeholder{'s' if count > 1 else ''} to fill in" if count else ""
    print(f"ok: {path} ({report.summary}){todo}")
    return 0


def _inspect(path) -> Report:
    config, problem = _read_yaml(Path(path))
    if problem:
        return Report([problem], [])
    if "apiVersion" in config or config.get("kind") == "RayCluster":
        return Report(_kuberay_problems(config), _kuberay_placeholders(config), _kuberay_summary(config))
    return _launcher_report(config)


def _read_yaml(path: Path) -> tuple[dict, Problem | None]:
    try:
        config = yaml.safe_load(path.read_text())
    except OSError as err:
        return {}, ("file", f"cannot read it: {err.strerror}")
    except yaml.YAMLError as err:
        return {}, ("file", "not valid YAML: " + _one_line(str(err)))
    if not isinstance(config, dict):
        return {}, ("file", "a cluster file is a YAML mapping (a Ray cluster-launcher config or a KubeRay RayCluster)")
    return config, None


# ----------------------------------------------------------------------------------------------------------------
# Ray cluster-launcher YAMLs


def _launcher_report(config: dict) -> Report:
    provider = config.get("provider")
    if not isinstance(provider, dict) or not isinstance(provider.get("type"), str):
        return Report([("provider.type", "missing: every cluster-launcher file names its provider (local, aws, gcp, "
                                         "...)")], [])
    prepared, ray_problems = _ray_prepare_and_validate(config)
    view = prepared if prepared is not None else _merged_setup(config)
    own = [
        *_unknown_keys(config),
        *_gpu_problems(config),
        *_install_problems(view),
        *_ray_version_problems(view),
        *_start_problems(view, config),
        *_network_problems(view),
    ]
    # Ray's line for a field that raydistill already explains (a fractional GPU, an unknown key) adds nothing.
    own_fields = {field for field, _ in own}
    problems = own + [problem for problem in ray_problems if problem[0] not in own_fields]
    return Report(problems, _launcher_placeholders(config), _launcher_summary(view))


def _ray_prepare_and_validate(config: dict) -> tuple[dict | None, list[Problem]]:
    """Ray's own checks at `ray up`, before any cloud call: (the prepared config or None, its problems)."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        with _quiet():
            prepared = prepare_config(copy.deepcopy(config))
    except Exception as err:  # whatever Ray raises while preparing (click abort, ValueError, ...) rejects the file
        if isinstance(err, (TypeError, AttributeError, KeyError)):
            # Ray tripped over a value of the wrong type; its schema names the field better than the traceback.
            try:
                jsonschema.validate(config, _ray_schema())
            except jsonschema.ValidationError as schema_err:
                return None, [_schema_problem(schema_err)]
        message = _one_line(getattr(err, "message", None) or str(err) or type(err).__name__)
        return None, [(_field_named_in(message), message)]
    try:
        with _quiet():
            validate_config(prepared)
    except jsonschema.ValidationError as err:
        return prepared, [_schema_problem(err)]
    except Exception as err:  # Ray's cross-field rules (head_node_type, max_workers) raise ValueError/RuntimeError
        message = _one_line(str(err))
        return prepared, [(_field_named_in(message), message)]
    return prepared, []


@contextlib.contextmanager
def _quiet():
    """Ray's launcher prints warnings and progress while it prepares; the checker's output is one line per problem."""
    ray_logger = logging.getLogger("ray")
    level = ray_logger.level
    ray_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        ray_logger.setLevel(level)


def _schema_problem(err) -> Problem:
    path = [str(part) for part in err.absolute_path]
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        path += sorted(set(err.instance) - set(err.schema.get("properties", {})))[:1]
    elif err.validator == "required" and isinstance(err.instance, dict):
        path += [name for name in err.validator_value if name not in err.instance][:1]
    return ".".join(path) or "config", _one_line(err.message) + " (Ray's cluster schema)"


def _field_named_in(message: str) -> str:
    """Ray names the offending field in its messages as `field` or "The field X"; that is the line's field."""
    named = re.search(r"The field (\w+)", message) or re.search(r"`(\w+)`", message)
    return named.group(1) if named else "config"


def _ray_schema() -> dict:
    """The JSON schema that Ray's validate_config applies, from the installed Ray."""
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _ray_schema_keys() -> list[str]:
    return sorted(_ray_schema()["properties"])


def _unknown_keys(config: dict) -> list[Problem]:
    known = _ray_schema_keys()
    problems = []
    for key in config:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "Ray " + _ray_version() + " knows: " + ", ".join(known)
        problems.append((str(key), f"unknown top-level key; {hint}"))
    return problems


def _node_types(config: dict) -> dict:
    node_types = config.get("available_node_types")
    return node_types if isinstance(node_types, dict) else {}


def _gpu_problems(config: dict) -> list[Problem]:
    problems = []
    for name, node_type in _node_types(config).items():
        if not isinstance(node_type, dict):
            continue
        resources = node_type.get("resources") or {}
        field = f"available_node_types.{name}.resources.GPU"
        gpus = resources.get("GPU") if isinstance(resources, dict) else None
        if gpus is not None and not _is_whole_count(gpus):
            problems.append((field, f"{gpus!r}: a node offers whole GPUs (0, 1, 2, ...); "
                                    "peers share a GPU through gpus_per_peer in the raydistill config"))
            continue
        attached = _gcp_attached_gpus(node_type) if config["provider"].get("type") == "gcp" else None
        if attached is not None and int(gpus or 0) != attached:
            problems.append((field, f"{gpus or 0}, but guestAccelerators attach {attached}; "
                                    "the autoscaler launches nodes by the resources declared here"))
    return problems


def _is_whole_count(value) -> bool:
    if isinstance(value, bool):
        return False
    return (isinstance(value, int) or (isinstance(value, float) and value.is_integer())) and value >= 0


def _gcp_attached_gpus(node_type: dict) -> int | None:
    accelerators = (node_type.get("node_config") or {}).get("guestAccelerators")
    if not isinstance(accelerators, list):
        return None
    return sum(int(item.get("acceleratorCount", 0)) for item in accelerators if isinstance(item, dict))


def _merged_setup(config: dict) -> dict:
    """The raw config with setup_commands merged in as Ray does, for when Ray's prepare_config rejected the file."""
    merged = dict(config)
    common = list(config.get("setup_commands") or [])
    merged["head_setup_commands"] = common + list(config.get("head_setup_commands") or [])
    merged["worker_setup_commands"] = common + list(config.get("worker_setup_commands") or [])
    return merged


def _setup_lists(view: dict) -> list[tuple[str, list]]:
    """(field, commands) for the head and every worker node type, as Ray runs them on those nodes."""
    head_type = view.get("head_node_type")
    lists = [("head_setup_commands", view.get("head_setup_commands") or [])]
    worker_types = [(n, t) for n, t in _node_types(view).items() if n != head_type and isinstance(t, dict)]
    for name, node_type in worker_types:
        if "worker_setup_commands" in node_type:  # a node type's own list replaces the global ones
            lists.append((f"available_node_types.{name}.worker_setup_commands", node_type["worker_setup_commands"]))
    if not worker_types or any("worker_setup_commands" not in t for _, t in worker_types):
        lists.append(("worker_setup_commands", view.get("worker_setup_commands") or []))
    return lists


def _install_problems(view: dict) -> list[Problem]:
    problems = []
    for field, commands in _setup_lists(view):
        if not any(_INSTALLS_RAYDISTILL.search(str(command)) for command in commands):
            problems.append((field, "no command installs raydistill (pip install ... raydistill); "
                                    "the driver and every peer actor import it"))
    return problems


def _ray_version() -> str:
    import ray

    return ray.__version__


def _ray_version_problems(view: dict) -> list[Problem]:
    """The cluster must run the Ray that validated this file (and that `ray up` / `ray job submit` run here)."""
    installed, problems = _ray_version(), []
    for field, commands in _setup_lists(view):
        pins = {pin for command in commands for pin in _RAY_PIN.findall(str(command))}
        problems += [(field, f"installs Ray {pin}, but this Ray is {installed}; pin ray=={installed}")
                     for pin in sorted(pins - {installed})]
    docker = view.get("docker") or {}
    images = {f"docker.{key}": docker.get(key) for key in ("image", "head_image", "worker_image")}
    for name, node_type in _node_types(view).items():
        if isinstance(node_type, dict) and isinstance(node_type.get("docker"), dict):
            images[f"available_node_types.{name}.docker.worker_image"] = node_type["docker"].get("worker_image")
    for field, image in images.items():
        tag = _RAY_IMAGE_TAG.match(str(image or ""))
        if tag and tag.group(1) != installed:
            problems.append((field, f"{image} runs Ray {tag.group(1)}, but this Ray is {installed}"))
    return problems


def _start_problems(view: dict, config: dict) -> list[Problem]:
    problems = []
    for field in ("head_start_ray_commands", "worker_start_ray_commands"):
        provider_type = config["provider"]["type"]
        origin = "" if field in config else f" (Ray's default for provider {provider_type}; write your own)"
        for command in view.get(field) or []:
            command = str(command)
            if not _RAY_START.search(command):
                continue
            if not _TOKEN_AUTH.search(command):
                problems.append((field, "`ray start` without token authentication; prefix it with "
                                        "RAY_AUTH_MODE=token (the token is read from ~/.ray/auth_token)" + origin))
            host = _DASHBOARD_HOST.search(command)
            if host and host.group(1) in _ALL_INTERFACES:
                problems.append((field, f"--dashboard-host={host.group(1)} exposes the dashboard (8265) on every "
                                        "interface; use --dashboard-host=127.0.0.1 and reach it over SSH "
                                        "(ray dashboard FILE)" + origin))
    return problems


def _network_problems(view: dict) -> list[Problem]:
    provider_type = view["provider"]["type"]
    problems = []
    for name, node_type in _node_types(view).items():
        node_config = (node_type.get("node_config") if isinstance(node_type, dict) else None) or {}
        if provider_type == "aws" and not _aws_names_security_groups(node_config):
            problems.append((f"available_node_types.{name}.node_config.SecurityGroupIds",
                             "missing: Ray would create a security group that opens SSH to 0.0.0.0/0; name your own "
                             "group (SSH from your CIDR only, all traffic within the group)"))
        if provider_type == "gcp" and "networkInterfaces" not in node_config:
            problems.append((f"available_node_types.{name}.node_config.networkInterfaces",
                             "missing: Ray would use the project's first subnet, usually the default network whose "
                             "default-allow-ssh rule is open to 0.0.0.0/0; name a subnet whose firewall admits SSH "
                             "from your CIDR only"))
    security_group = view["provider"].get("security_group")
    rules = (security_group.get("IpPermissions") if isinstance(security_group, dict) else None) or []
    for index, rule in enumerate(rules):
        for port in _public_ray_ports(rule):
            problems.append((f"provider.security_group.IpPermissions[{index}]",
                             f"opens port {port} ({_RAY_PORTS[port]}) to the internet; reach it over SSH instead"))
    return problems


def _aws_names_security_groups(node_config: dict) -> bool:
    if node_config.get("SecurityGroupIds"):
        return True
    interfaces = node_config.get("NetworkInterfaces") or []
    return bool(interfaces) and all(isinstance(i, dict) and i.get("Groups") for i in interfaces)


def _public_ray_ports(rule) -> list[int]:
    if not isinstance(rule, dict):
        return []
    cidrs = {r.get("CidrIp") for r in rule.get("IpRanges") or [] if isinstance(r, dict)}
    cidrs |= {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges") or [] if isinstance(r, dict)}
    if not cidrs & _PUBLIC_CIDRS:
        return []
    if str(rule.get("IpProtocol")) == "-1":
        return sorted(_RAY_PORTS)
    low, high = rule.get("FromPort"), rule.get("ToPort")
    if not (isinstance(low, int) and isinstance(high, int)):
        return []
    return [port for port in sorted(_RAY_PORTS) if low <= port <= high]


def _launcher_summary(view: dict) -> str:
    provider_type = view["provider"]["type"]
    if provider_type == "local" and "worker_ips" in view["provider"]:
        hosts = 1 + len(view["provider"].get("worker_ips") or [])
        return f"provider local, {hosts} hosts, GPUs detected by Ray on each host"
    node_types = _node_types(view)
    gpus = [int(t.get("resources", {}).get("GPU", 0)) for t in node_types.values()
            if isinstance(t, dict) and _is_whole_count(t.get("resources", {}).get("GPU", 0))]
    gpu_text = f"{max(gpus)} GPUs max per node" if gpus and max(gpus) else "no GPUs declared"
    return f"provider {provider_type}, {len(node_types)} node types, {gpu_text}"


# ----------------------------------------------------------------------------------------------------------------
# Placeholders: values that only stand in for the user's own. Ray accepts them offline; the cloud refuses them later.

# The node_config keys that hold AWS ids: (prefix, what the user puts there). An id is the prefix, 8 or 17 hex digits.
_AWS_ID_FIELDS = {"ImageId": ("ami", "AMI id"), "SecurityGroupIds": ("sg", "security-group id"),
                  "Groups": ("sg", "security-group id"), "SubnetIds": ("subnet", "subnet id"),
                  "SubnetId": ("subnet", "subnet id")}
_AWS_ID_DIGITS = re.compile(r"[0-9a-f]{8}|[0-9a-f]{17}")
# AWS's documentation writes ids as runs of hex digits (ami-0123456789abcdef0, sg-12345678, ami-0abcdef1234567890);
# eight in a row do not happen in a real, random id.
_HEX_RUNS = ("0123456789abcdef" * 2, "1234567890" * 2)
_AWS_EXAMPLE_ACCOUNT = "123456789012"
_GCP_PROJECT_ID = re.compile(r"[a-z][a-z0-9-]{4,28}[a-z0-9]")
_GCP_EXAMPLE_PROJECT = re.compile(r"^(?:my|your)-|example|project-?id")
_GCP_PROJECT_IN_PATH = re.compile(r"\bprojects/([^/\s]+)/")
# RFC 5737 (IPv4) and RFC 3849 (IPv6) documentation ranges
_DOCUMENTATION_NETWORKS = tuple(ipaddress.ip_network(net) for net in
                                ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"))
_EXAMPLE_DOMAIN = re.compile(r"(?:^|\.)(?:example\.(?:com|net|org)|example)$")                            # RFC 2606
_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
                        r"[A-Za-z0-9])?)*")


def _launcher_placeholders(config: dict) -> list[Problem]:
    provider = config["provider"]
    found = []
    if provider["type"] == "aws":
        for name, node_type in _node_types(config).items():
            node_config = node_type.get("node_config") if isinstance(node_type, dict) else None
            for field, key, value in _strings(f"available_node_types.{name}.node_config", node_config):
                found.append(_aws_placeholder(field, key, value))
    if provider["type"] == "gcp":
        found.append(_gcp_project_placeholder("provider.project_id", provider.get("project_id")))
        for name, node_type in _node_types(config).items():
            node_config = node_type.get("node_config") if isinstance(node_type, dict) else None
            for field, _, value in _strings(f"available_node_types.{name}.node_config", node_config):
                found += [_gcp_project_placeholder(field, value, project)
                          for project in _GCP_PROJECT_IN_PATH.findall(value)]
    if provider["type"] == "local":
        hosts = [("provider.head_ip", provider.get("head_ip"))]
        worker_ips = provider.get("worker_ips")
        hosts += [(f"provider.worker_ips[{i}]", host) for i, host in enumerate(worker_ips)] \
            if isinstance(worker_ips, list) else []
        found += [_host_placeholder(field, host) for field, host in hosts if host is not None]
    return [warning for warning in found if warning]


def _strings(field: str, node, key: str | None = None):
    """(field path, the mapping key it sits under, value) of every string in a YAML tree."""
    if isinstance(node, dict):
        for name, value in node.items():
            yield from _strings(f"{field}.{name}", value, str(name))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _strings(f"{field}[{index}]", value, key)
    elif isinstance(node, str):
        yield field, key, node


def _aws_placeholder(field: str, key: str | None, value: str) -> Problem | None:
    if key in _AWS_ID_FIELDS and not (key == "ImageId" and value.lower() == "latest_dlami"):  # Ray's own keyword
        prefix, what = _AWS_ID_FIELDS[key]
        digits = value[len(prefix) + 1:] if value.startswith(f"{prefix}-") else ""
        if not _AWS_ID_DIGITS.fullmatch(digits):
            return field, (f"{value!r} is not an AWS {what} ({prefix}- and 8 or 17 hex digits): a placeholder; "
                           f"put your {what} here")
        if len(set(digits)) == 1 or any(digits[i:i + 8] in run for run in _HEX_RUNS for i in range(len(digits) - 7)):
            return field, f"{value!r} is a placeholder (an example id from AWS's documentation); put your {what} here"
    if f":{_AWS_EXAMPLE_ACCOUNT}:" in value:
        return field, (f"{value!r} names AWS's example account {_AWS_EXAMPLE_ACCOUNT}: a placeholder; "
                       "put your account id here")
    return None


def _gcp_project_placeholder(field: str, value, project=None) -> Problem | None:
    """`project` is the project id named inside `value` (a resource path); by default the value is the id."""
    if value is None:
        return None
    project = str(value) if project is None else project
    if not _GCP_PROJECT_ID.fullmatch(project):
        return field, (f"{value!r}: {project!r} is not a GCP project id (6 to 30 lowercase letters, digits and "
                       "hyphens): a placeholder; put your project id here")
    if _GCP_EXAMPLE_PROJECT.search(project):
        return field, f"{value!r} is a placeholder (an example project id); put your project id here"
    return None


def _host_placeholder(field: str, host) -> Problem | None:
    host = str(host)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if _EXAMPLE_DOMAIN.search(host.lower()):
            return field, f"{host!r} is a placeholder (a documentation domain, RFC 2606); put your host here"
        if not _HOST_NAME.fullmatch(host):
            return field, f"{host!r} is not an IP address or a host name: a placeholder; put your host here"
        return None
    if any(address.version == net.version and address in net for net in _DOCUMENTATION_NETWORKS):
        return field, f"{host!r} is a placeholder (a documentation address, RFC 5737); put your host's address here"
    return None


# ----------------------------------------------------------------------------------------------------------------
# KubeRay RayCluster manifests


def _kuberay_problems(manifest: dict) -> list[Problem]:
    problems = []
    if manifest.get("apiVersion") != _KUBERAY_API:
        problems.append(("apiVersion", f"{manifest.get('apiVersion')!r}: a RayCluster is {_KUBERAY_API}"))
    if manifest.get("kind") != "RayCluster":
        problems.append(("kind", f"{manifest.get('kind')!r}: the checker knows kind RayCluster"))
    spec = manifest.get("spec")
    if not isinstance(spec, dict):
        return problems + [("spec", "missing: a RayCluster has a spec with headGroupSpec and workerGroupSpecs")]
    installed = _ray_version()
    if str(spec.get("rayVersion", "")) != installed:
        problems.append(("spec.rayVersion", f"{spec.get('rayVersion')!r}: pin the Ray this file was checked with, "
                                            f"{installed!r} (KubeRay needs it for token authentication)"))
    groups = _kuberay_groups(spec, problems)
    if not _kuberay_token_auth(spec, groups):
        problems.append(("spec.authOptions.mode", "token authentication is off; set spec.authOptions.mode: token "
                                                  "(KubeRay 1.5.1+), or give every Ray container RAY_AUTH_MODE=token "
                                                  "and RAY_AUTH_TOKEN from a Secret"))
    head = spec.get("headGroupSpec")
    if isinstance(head, dict) and head.get("serviceType") in ("LoadBalancer", "NodePort"):
        problems.append(("spec.headGroupSpec.serviceType", f"{head['serviceType']} exposes GCS (6379) and the "
                                                           "dashboard (8265) outside the cluster; use ClusterIP and "
                                                           "kubectl port-forward"))
    for field, group in groups:
        host = str((group.get("rayStartParams") or {}).get("dashboard-host", ""))
        if host in _ALL_INTERFACES:
            problems.append((f"{field}.rayStartParams.dashboard-host", f"{host!r} exposes the dashboard on every "
                                                                       "interface; use '127.0.0.1' and kubectl "
                                                                       "port-forward"))
        for index, container in enumerate(_containers(group)):
            resources = container.get("resources") or {}
            for kind in ("limits", "requests"):
                gpus = (resources.get(kind) or {}).get(_GPU_RESOURCE_K8S)
                if gpus is not None and _k8s_whole_count(gpus) is None:
                    problems.append((f"{field}.template.spec.containers[{index}].resources.{kind}.{_GPU_RESOURCE_K8S}",
                                     f"{gpus!r}: Kubernetes gives a pod whole GPUs; peers share a GPU through "
                                     "gpus_per_peer in the raydistill config"))
    return problems


def _kuberay_placeholders(manifest: dict) -> list[Problem]:
    """Container images pulled from a documentation domain (registry.example.com/...)."""
    spec = manifest.get("spec")
    if not isinstance(spec, dict):
        return []
    found = []
    for field, group in _kuberay_groups(spec, []):
        for index, container in enumerate(_containers(group)):
            image = str(container.get("image", ""))
            registry = image.split("/")[0] if "/" in image else ""
            if _EXAMPLE_DOMAIN.search(registry.split(":")[0].lower()):
                found.append((f"{field}.template.spec.containers[{index}].image",
                              f"{image!r} is a placeholder (a documentation domain, RFC 2606); put the image you "
                              "pushed here"))
    return found


def _kuberay_groups(spec: dict, problems: list) -> list[tuple[str, dict]]:
    """(field, group spec) for the head and every worker group; structural problems are appended to `problems`."""
    groups = []
    head = spec.get("headGroupSpec")
    if isinstance(head, dict):
        groups.append(("spec.headGroupSpec", head))
    else:
        problems.append(("spec.headGroupSpec", "missing: a RayCluster needs a head group"))
    workers = spec.get("workerGroupSpecs", [])
    if not isinstance(workers, list):
        problems.append(("spec.workerGroupSpecs", "a list of worker groups"))
        workers = []
    for index, group in enumerate(workers):
        field = f"spec.workerGroupSpecs[{index}]"
        if not isinstance(group, dict) or not group.get("groupName"):
            problems.append((f"{field}.groupName", "missing: every worker group has a name"))
        if isinstance(group, dict):
            groups.append((field, group))
    for field, group in groups:
        if not _containers(group):
            problems.append((f"{field}.template.spec.containers", "missing: the Ray container of this group"))
    return groups


def _containers(group: dict) -> list[dict]:
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers")
    return [c for c in containers if isinstance(c, dict)] if isinstance(containers, list) else []


def _kuberay_token_auth(spec: dict, groups: list[tuple[str, dict]]) -> bool:
    if (spec.get("authOptions") or {}).get("mode") == "token":
        return True
    containers = [c for _, group in groups for c in _containers(group)]
    return bool(containers) and all(
        any(e.get("name") == "RAY_AUTH_MODE" and e.get("value") == "token" for e in c.get("env") or [])
        for c in containers)


def _k8s_whole_count(quantity) -> int | None:
    """A Kubernetes quantity of a device resource as a whole number, or None ("0.5", "500m" are not)."""
    if isinstance(quantity, bool):
        return None
    if isinstance(quantity, int):
        return quantity if quantity >= 0 else None
    return int(quantity) if isinstance(quantity, str) and quantity.isdigit() else None


def _kuberay_summary(manifest: dict) -> str:
    spec = manifest.get("spec") or {}
    groups = _kuberay_groups(spec, [])
    gpus = [_k8s_whole_count(((c.get("resources") or {}).get("limits") or {}).get(_GPU_RESOURCE_K8S, 0)) or 0
            for _, group in groups for c in _containers(group)]
    gpu_text = f"{max(gpus)} GPUs max per pod" if gpus and max(gpus) else "no GPUs requested"
    return f"KubeRay RayCluster, {len(groups)} groups, {gpu_text}"


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
