#!/bin/sh
# One-shot: the buckets, and one S3 user per client, each allowed on its own bucket only.
# Idempotent (mc mb --ignore-existing; users and policies are overwritten), so `up` may rerun it.
set -eu
: "${S3_ROOT_USER:?}" "${S3_ROOT_PASSWORD:?}" "${S3_BUCKET:?}" "${MLFLOW_BUCKET:?}"
: "${RADGROUND_S3_ACCESS_KEY:?}" "${RADGROUND_S3_SECRET_KEY:?}" "${MLFLOW_S3_ACCESS_KEY:?}" "${MLFLOW_S3_SECRET_KEY:?}"

mc alias set stack http://s3:9000 "$S3_ROOT_USER" "$S3_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "stack/$S3_BUCKET" "stack/$MLFLOW_BUCKET"

policy() {  # name bucket: read/write/list on one bucket
  cat > "/tmp/$1.json" <<JSON
{"Version": "2012-10-17", "Statement": [
  {"Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
   "Resource": ["arn:aws:s3:::$2"]},
  {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
   "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"], "Resource": ["arn:aws:s3:::$2/*"]}]}
JSON
  mc admin policy create stack "$1" "/tmp/$1.json" >/dev/null
}
policy radground-rw "$S3_BUCKET"
policy mlflow-rw "$MLFLOW_BUCKET"
mc admin user add stack "$RADGROUND_S3_ACCESS_KEY" "$RADGROUND_S3_SECRET_KEY" >/dev/null
mc admin user add stack "$MLFLOW_S3_ACCESS_KEY" "$MLFLOW_S3_SECRET_KEY" >/dev/null
attach() {  # policy user; attaching twice fails in mc, so check the outcome rather than the exit code
  mc admin policy attach stack "$1" --user "$2" >/dev/null 2>&1 || true
  mc admin user info stack "$2" | grep -q "$1" || { echo "could not attach policy $1 to an S3 user" >&2; exit 1; }
}
attach radground-rw "$RADGROUND_S3_ACCESS_KEY"
attach mlflow-rw "$MLFLOW_S3_ACCESS_KEY"
echo "buckets $S3_BUCKET and $MLFLOW_BUCKET ready"
