"""Write the KubeRay CRD schemas the cluster tests validate against (tests/kuberay_crds/) from KubeRay's
own CRD files, e.g. for a newer operator release:

    git clone --branch v1.5.1 https://github.com/ray-project/kuberay
    python scripts/kuberay_crds.py v1.5.1 kuberay/ray-operator/config/crd/bases/ray.io_rayclusters.yaml \\
        kuberay/ray-operator/config/crd/bases/ray.io_rayjobs.yaml [--commit SHA]

Each output keeps only the ray.io/v1 openAPIV3Schema, with where it came from; then set KUBERAY in
tests/test_cluster_kuberay.py to the release.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "tests" / "kuberay_crds"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("release", help="the KubeRay release tag the files come from, e.g. v1.5.1")
    ap.add_argument("crds", nargs="+", type=Path, help="ray.io_rayclusters.yaml, ray.io_rayjobs.yaml")
    ap.add_argument("--commit", default="", help="the commit of the release, recorded as the source")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    for path in args.crds:
        crd = yaml.safe_load(path.read_text())
        kind = crd["spec"]["names"]["kind"]
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        source = (f"https://github.com/ray-project/kuberay/blob/{args.release}/ray-operator/config/crd/bases/"
                  f"{path.name}" + (f" (commit {args.commit})" if args.commit else "")
                  + ", spec.versions[v1].schema.openAPIV3Schema")
        data = {"kind": kind, "apiVersion": "ray.io/v1", "source": source,
                "openAPIV3Schema": v1["schema"]["openAPIV3Schema"]}
        target = OUT / f"{kind.lower()}-{args.release}.json.gz"
        with gzip.GzipFile(target, "wb", mtime=0) as f:
            f.write(json.dumps(data, sort_keys=True, separators=(",", ":")).encode())
        print(target)


if __name__ == "__main__":
    main()
