#!/usr/bin/env python3
"""Write an OCI image as a tar (image layout) from a directory, without Docker or a registry.

    hack/oci-image.py OUT.tar NAME ROOTFS_DIR CONFIG_JSON

One uncompressed layer holding ROOTFS_DIR (owners and modes kept, times zeroed, so the same
files give the same digest); CONFIG_JSON is the image config's "config" object (User,
Entrypoint, Cmd, Env, WorkingDir, ExposedPorts). The image is named NAME (the annotations
`ctr images import` reads). Standard library only.
"""
import hashlib
import io
import json
import os
import sys
import tarfile


def deterministic(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime = 0
    info.uname = info.gname = ""
    return info


def layer_of(root: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                path = os.path.join(dirpath, name)
                tar.add(path, arcname=os.path.relpath(path, root), recursive=False,
                        filter=deterministic)
    return buf.getvalue()


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compact(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def main() -> None:
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    out, name, root, config_json = sys.argv[1:]
    layer = layer_of(root)
    config = compact({
        "architecture": "amd64",
        "os": "linux",
        "config": json.loads(config_json),
        "rootfs": {"type": "layers", "diff_ids": [digest(layer)]},
        "history": [{"created_by": "hack/oci-image.py"}],
    })
    manifest = compact({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest(layer), "size": len(layer)}],
    })
    index = compact({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(manifest), "size": len(manifest),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": name,
                            "org.opencontainers.image.ref.name": name},
        }],
    })
    with tarfile.open(out, "w") as tar:
        def put(path: str, data: bytes) -> None:
            info = deterministic(tarfile.TarInfo(path))
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
        put("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        put("index.json", index)
        for data in (config, layer, manifest):
            put("blobs/sha256/" + digest(data).split(":")[1], data)
    print(name, digest(manifest))


if __name__ == "__main__":
    main()
