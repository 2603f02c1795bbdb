#!/bin/sh
# Label Studio in compose: it reads its database password, admin password, API token and Django secret key from
# the environment only, so they are exported here from the secret files, then the image's own entrypoint runs.
set -eu

secret() {
    value=""
    IFS= read -r value < "/run/secrets/$1" || [ -n "$value" ]
    printf '%s' "$value"
}

POSTGRE_PASSWORD=$(secret labelstudio_db_password)
LABEL_STUDIO_PASSWORD=$(secret labelstudio_admin_password)
LABEL_STUDIO_USER_TOKEN=$(secret labelstudio_token)
SECRET_KEY=$(secret labelstudio_secret_key)
export POSTGRE_PASSWORD LABEL_STUDIO_PASSWORD LABEL_STUDIO_USER_TOKEN SECRET_KEY
exec ./deploy/docker-entrypoint.sh label-studio
