# What radground's flow-run pods need on top of the Kubernetes worker's default base job template.
# Applied to the template the server hands out, never to a copy kept here (see README.md):
#   prefect work-pool get-default-base-job-template --type kubernetes \
#     | jq -f infra/k8s/base-job-template.jq > base-job-template.json
#   prefect work-pool update radground-k8s --base-job-template base-job-template.json
# Settings from radground-config / radground-env; Ray's token as a file from radground-ray-auth (Ray reads
# RAY_AUTH_TOKEN_PATH), so no secret value passes through Prefect; the image's non-root user.
(.job_configuration.job_manifest.spec.template.spec) |= (
    # The default puts these two Job fields in the pod spec, where Kubernetes drops them (strict validation
    # rejects them); 1 and 1 are the Job's defaults anyway.
    del(.parallelism, .completions)
  | .containers[0].envFrom = [{"configMapRef": {"name": "radground-config"}}, {"secretRef": {"name": "radground-env"}}]
  | .containers[0].volumeMounts = [{"name": "ray-auth", "mountPath": "/var/run/secrets/ray", "readOnly": true}]
  | .volumes = [{"name": "ray-auth", "secret": {"secretName": "radground-ray-auth"}}]
  | .securityContext = {"runAsNonRoot": true, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001}
)
# Defaults of the pool's job variables; a deployment's job_variables override them (a deployment that sets
# env must repeat these two).
| .variables.properties.env.default = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/var/run/secrets/ray/auth_token"}
| .variables.properties.namespace.default = "radground"
| .variables.properties.image.default = "radground:0.1.0-ray2.60.0-py311-cpu"
| .variables.properties.memory_request.default = "4Gi"
| .variables.properties.memory_limit.default = "4Gi"
