#!/bin/sh
# MinIO at start: the buckets, and one user per vlmflow service whose policy reaches only the buckets that
# service needs (policies/<service>.json). Every step may run again: each `docker compose up` runs this.
# Shell builtins and mc only: the mc image has no grep or sed.
set -eu

secret() {
    value=""
    IFS= read -r value < "/run/secrets/$1" || [ -n "$value" ]
    printf '%s' "$value"
}

mc alias set store http://minio:9000 "$(secret minio_root_user)" "$(secret minio_root_password)"
mc mb --ignore-existing store/vlm-images store/vlm-datasets
for service in worker streams labelstudio; do
    mc admin policy create store "vlmflow-$service" "/init/policies/$service.json"
    mc admin user add store "vlmflow-$service" "$(secret "${service}_s3_secret_key")"
    mc admin policy attach store "vlmflow-$service" --user "vlmflow-$service"
done
