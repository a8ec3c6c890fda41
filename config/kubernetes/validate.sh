#!/usr/bin/env bash
# Checks the install manifests beside this script without a cluster:
# - each Kubernetes object against the API's own schemas (kubernetes-validate
#   from PyPI, strict: an unknown or misspelt field is an error), for the
#   oldest and the newest Kubernetes this install is meant for;
# - the agent config inside configmap.yaml with `sluice config check`, when a
#   built `sluice` is at hand (this script never builds);
# - kustomization.yaml: it names every manifest here, and `kubectl kustomize`
#   renders it when kubectl is installed;
# - policy-crd.yaml's schema: structural as the API server demands (checked
#   here, because kubernetes-validate checks the CRD object's fields but not
#   the schema inside it), and it accepts every example in examples/ and
#   refuses every one in examples/invalid/ (jsonschema from PyPI).
# Schema checks cannot see the API server's other rules (for example that
# Bidirectional mount propagation needs a privileged container); the
# comments in daemonset.yaml say where those were weighed.
#
# Usage: config/kubernetes/validate.sh   (SLUICE_BIN=path picks the binary)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$root/target/k8s-validate-venv"

# Pinned so that a run today and a run next month judge the same way.
validator_version="1.37.0"
# The schema library kubernetes-validate itself uses (>= 4.23.0 there).
jsonschema_version="4.26.0"
# The oldest Kubernetes the manifests are meant for (appArmorProfile in the
# security context arrived in 1.30) and the newest the validator knows.
k8s_versions=(1.30 1.37)
# Custom resources: their schemas come with their operators, which
# kubernetes-validate does not ship.
declare -A crd_files=([podmonitor.yaml]="PodMonitor is a Prometheus Operator custom resource")

# Debian's interpreter when there is one: that is the one python3-venv serves.
python=python3
if [[ -x /usr/bin/python3 ]]; then python=/usr/bin/python3; fi

ensure_venv_support() {
    if command -v "$python" >/dev/null && "$python" -c 'import ensurepip, venv' 2>/dev/null; then
        return
    fi
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        echo "validate.sh: Python cannot make virtual environments here; install python3-venv" >&2
        exit 1
    fi
    echo "installing python3-venv (Python cannot make virtual environments without it)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null
}

ensure_validator() {
    if [[ -x "$venv/bin/kubernetes-validate" ]] &&
        [[ "$("$venv/bin/kubernetes-validate" --version)" == "$validator_version" ]] &&
        [[ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("jsonschema"))')" == "$jsonschema_version" ]]; then
        return
    fi
    ensure_venv_support
    echo "setting up $venv with kubernetes-validate $validator_version and jsonschema $jsonschema_version"
    [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "kubernetes-validate==$validator_version" "jsonschema==$jsonschema_version"
}

passed=0
failed=0
skipped=0
pass() { printf 'ok    %s\n' "$1"; passed=$((passed + 1)); }
fail() { printf 'FAIL  %s\n' "$1"; failed=$((failed + 1)); }
skip() { printf 'skip  %s\n' "$1"; skipped=$((skipped + 1)); }

# One object kind per file here, so the first kind/name says what was checked.
check_manifest() {
    local file="$1" name="${1##*/}" args=() out rc=0 v
    for v in "${k8s_versions[@]}"; do args+=(-k "$v"); done
    out="$("$venv/bin/kubernetes-validate" --strict "${args[@]}" "$file" 2>&1)" || rc=$?
    # A manifest here with no schema means a wrong apiVersion or kind: the
    # validator only warns about that, so count it as a failure.
    if [[ $rc -eq 0 ]] && ! grep -qE '^(WARN|ERROR|FATAL)' <<<"$out"; then
        local objects
        objects="$(sed -nE 's/^INFO .* for resource ([^ ]+) against version.*/\1/p' <<<"$out" | sort -u | paste -sd, -)"
        if [[ -z "$objects" ]]; then
            fail "$name: no Kubernetes object in it"
            return
        fi
        pass "$name: $objects valid for Kubernetes $(printf '%s and ' "${k8s_versions[@]}" | sed 's/ and $//') (strict)"
    else
        fail "$name"
        grep -vE '^INFO' <<<"$out" | sed 's/^/      /'
    fi
}

check_agent_config() {
    local bin="${SLUICE_BIN:-}"
    if [[ -z "$bin" ]]; then
        # The more recently built of the two, so the check follows the code.
        for candidate in "$root/target/release/sluice" "$root/target/debug/sluice"; do
            if [[ -x "$candidate" && ( -z "$bin" || "$candidate" -nt "$bin" ) ]]; then
                bin="$candidate"
            fi
        done
    fi
    if [[ -z "$bin" ]]; then
        skip "configmap.yaml sluice.yaml: no built sluice (cargo xtask build, or set SLUICE_BIN)"
        return
    fi
    local tmp out
    tmp="$(mktemp -d)"
    "$venv/bin/python" - "$here/configmap.yaml" "$tmp/sluice.yaml" <<'EOF'
import sys, yaml
config_map = yaml.safe_load(open(sys.argv[1]))
open(sys.argv[2], "w").write(config_map["data"]["sluice.yaml"])
EOF
    if out="$("$bin" config check "$tmp/sluice.yaml" 2>&1)"; then
        out="${out##*(}"
        pass "configmap.yaml sluice.yaml: accepted by ${bin#"$root/"} config check (${out%)})"
    else
        fail "configmap.yaml sluice.yaml: refused by ${bin#"$root/"} config check"
        sed "s|$tmp/||; s/^/      /" <<<"$out"
    fi
    rm -rf "$tmp"
}

check_kustomization() {
    local listing rendered
    # Every manifest here except the custom resources must be listed, and
    # every listed file must exist.
    if ! listing="$("$venv/bin/python" - "$here" "${!crd_files[@]}" <<'EOF'
import pathlib, sys, yaml
here = pathlib.Path(sys.argv[1])
crds = set(sys.argv[2:])
listed = yaml.safe_load((here / "kustomization.yaml").read_text())["resources"]
present = {p.name for p in here.glob("*.yaml")} - {"kustomization.yaml"} - crds
problems = [f"lists {name}, which does not exist" for name in listed if not (here / name).exists()]
problems += [f"does not list {name}" for name in sorted(present - set(listed))]
print("; ".join(problems) if problems else f"lists all {len(listed)} manifests")
sys.exit(1 if problems else 0)
EOF
    )"; then
        fail "kustomization.yaml: $listing"
        return
    fi
    if ! command -v kubectl >/dev/null; then
        pass "kustomization.yaml: $listing (render skipped: no kubectl)"
        return
    fi
    if rendered="$(kubectl kustomize "$here" 2>&1)"; then
        pass "kustomization.yaml: $listing; kubectl kustomize renders $(grep -c '^kind:' <<<"$rendered") objects"
    else
        fail "kustomization.yaml: kubectl kustomize refused it"
        sed 's/^/      /' <<<"$rendered"
    fi
}

# policy-crd.yaml's openAPIV3Schema, and the examples against it. The API
# server refuses a CRD whose schema is not structural (every node typed;
# additionalProperties and properties never together), and with strict
# field validation (kubectl's default) refuses an unknown field: the check
# reads the schema the same way, every `properties` closed.
check_policy_schema() {
    local out rc=0 line
    out="$("$venv/bin/python" - "$here" 2>&1 <<'EOF'
import copy, pathlib, sys, yaml, jsonschema

here = pathlib.Path(sys.argv[1])
crd = yaml.safe_load((here / "policy-crd.yaml").read_text())
failed = False

def report(ok, text, details=()):
    global failed
    failed |= not ok
    print(("ok" if ok else "FAIL") + "\t" + text)
    for d in details:
        print("detail\t" + d)

def structural(node, at, problems):
    if not isinstance(node, dict):
        problems.append(f"{at}: not a schema")
        return
    for key in ("allOf", "anyOf", "oneOf", "not"):
        if key in node:
            problems.append(f"{at}: uses {key}, which this check does not follow; extend it")
    if "type" not in node and not node.get("x-kubernetes-int-or-string") \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(f"{at}: has no type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{at}: has both properties and additionalProperties")
    for name, child in node.get("properties", {}).items():
        structural(child, f"{at}.{name}", problems)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            structural(node[key], f"{at}[{key}]", problems)

def preserves_unknown(node, at):
    found = [at] if isinstance(node, dict) and node.get("x-kubernetes-preserve-unknown-fields") else []
    if isinstance(node, dict):
        for name, child in node.get("properties", {}).items():
            found += preserves_unknown(child, f"{at}.{name}")
        for key in ("items", "additionalProperties"):
            found += preserves_unknown(node.get(key), f"{at}[{key}]")
    return found

def closed(node):
    # What strict field validation does: a field not under properties is an
    # error, unless the schema says to keep unknown fields.
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for child in node.get("properties", {}).values():
            closed(child)
        for key in ("items", "additionalProperties"):
            closed(node.get(key))
    return node

spec = crd["spec"]
version = spec["versions"][0]
schema = version["schema"]["openAPIV3Schema"]
problems = []
structural(schema, "openAPIV3Schema", problems)
problems += [f"{at}: x-kubernetes-preserve-unknown-fields on spec lets any field through"
             for at in preserves_unknown(schema.get("properties", {}).get("spec"), "openAPIV3Schema.spec")]
report(not problems, f"policy-crd.yaml: {spec['names']['kind']} {version['name']} schema is structural, spec closed", problems)

api_version = f"{spec['group']}/{version['name']}"
validator = jsonschema.Draft4Validator(closed(copy.deepcopy(schema)))
def errors(obj):
    found = []
    if obj.get("apiVersion") != api_version or obj.get("kind") != spec["names"]["kind"]:
        found.append(f"not a {spec['names']['kind']} of {api_version}")
    for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        # The regex itself would bury the value it refused; the field
        # says which kind of value was wanted.
        message = f"{e.instance!r} does not match the field's pattern" if e.validator == "pattern" else e.message
        found.append(f"{'.'.join(map(str, e.absolute_path)) or '(object)'}: {message}")
    return found

valid = sorted((here / "examples").glob("*.yaml"))
invalid = sorted((here / "examples" / "invalid").glob("*.yaml"))
if not valid or not invalid:
    report(False, "examples/: needs valid examples and invalid ones under examples/invalid/")
for path in valid:
    name = path.relative_to(here)
    found = errors(yaml.safe_load(path.read_text()))
    report(not found, f"{name}: valid against the {api_version} schema", found)
for path in invalid:
    name = path.relative_to(here)
    obj = yaml.safe_load(path.read_text())
    if obj.get("apiVersion") != api_version or obj.get("kind") != spec["names"]["kind"]:
        report(False, f"{name}: not a {spec['names']['kind']} of {api_version}, so it proves nothing")
        continue
    found = errors(obj)
    if found:
        report(True, f"{name}: refused by the schema ({found[0]})")
    else:
        report(False, f"{name}: accepted by the schema, but it is meant to be invalid: {path.read_text().splitlines()[0]}")
sys.exit(1 if failed else 0)
EOF
    )" || rc=$?
    local counted=0 refused=0
    while IFS= read -r line; do
        case "$line" in
            ok$'\t'*) pass "${line#*$'\t'}"; counted=$((counted + 1)) ;;
            FAIL$'\t'*) fail "${line#*$'\t'}"; counted=$((counted + 1)); refused=$((refused + 1)) ;;
            detail$'\t'*) printf '      %s\n' "${line#*$'\t'}" ;;
            *) printf '      %s\n' "$line" ;;
        esac
    done <<<"$out"
    # A crash of the check itself (a traceback, no verdict) must fail too.
    if [[ $rc -ne 0 && $refused -eq 0 ]] || [[ $counted -eq 0 ]]; then
        fail "policy-crd.yaml: the schema check did not run to the end (exit $rc)"
    fi
}

ensure_validator
for file in "$here"/*.yaml; do
    name="${file##*/}"
    if [[ $name == kustomization.yaml ]]; then
        continue
    elif [[ -n "${crd_files[$name]:-}" ]]; then
        skip "$name: ${crd_files[$name]}; kubernetes-validate has no schema for it"
    else
        check_manifest "$file"
    fi
done
check_kustomization
check_policy_schema
check_agent_config
echo "summary: $passed passed, $failed failed, $skipped skipped"
[[ $failed -eq 0 ]]
