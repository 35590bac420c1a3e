{{/*
Names, labels, images and the operator's RBAC rules: every template takes them from here, so
each is written once.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "tolaria.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The prefix of every object name: the release name, plus the chart name unless it is in it. */}}
{{- define "tolaria.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "tolaria.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of the operator's Deployment, ServiceAccount and RBAC objects. */}}
{{- define "tolaria.operatorName" -}}
{{- printf "%s-operator" (include "tolaria.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The Secret, in the release namespace, that keeps the operator's run-token key: the operator
creates it on its first start and reads no other Secret (the token Role below grants `get`
on this name only). It outlives `helm uninstall`, so a reinstalled operator still reaches
the sidecars of runs started before.
*/}}
{{- define "tolaria.keySecretName" -}}
{{- printf "%s-token-key" (include "tolaria.operatorName" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tolaria.leaseName" -}}
{{- printf "%s-leader" (include "tolaria.operatorName" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The leader-election Lease, in the release namespace: read, made once, renewed. */}}
{{- define "tolaria.leaseRules" -}}
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "create", "patch"]
{{- end -}}

{{- define "tolaria.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tolaria.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Who the (Cluster)RoleBindings bind: the operator's ServiceAccount. */}}
{{- define "tolaria.subjects" -}}
- kind: ServiceAccount
  name: {{ include "tolaria.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
{{- end -}}

{{/*
Labels of the operator's pods and what selects them. The operator is told them
(TOLARIA_OPERATOR_NETWORK_OPERATOR_POD_LABELS): run pods' NetworkPolicies admit exactly these
pods to the sidecar's control port.
*/}}
{{- define "tolaria.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-operator" (include "tolaria.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object of the release. */}}
{{- define "tolaria.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "tolaria.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tolaria
{{- end -}}

{{/*
An image reference from images.<which>: its registry (else images.registry; none: Docker Hub),
repository and tag (else the chart's appVersion, the version of the operator it installs).
*/}}
{{- define "tolaria.image" -}}
{{- $image := index .root.Values.images .which -}}
{{- $registry := default .root.Values.images.registry $image.registry -}}
{{- $tag := default .root.Chart.AppVersion $image.tag -}}
{{- if $registry -}}
{{- printf "%s/%s:%s" $registry $image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" $image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/*
What the operator does in each namespace it watches (rendered into a ClusterRole with
watch.allNamespaces, else into a Role per namespace). Every rule is a call the operator makes;
tests/chart/test_rbac.py derives those calls from the operator's code and checks this list
grants them and nothing more.
*/}}
{{- define "tolaria.namespacedRules" -}}
# Runs: kopf lists and watches them and patches its finalizer and annotations; the operator
# reads them, writes their status, and deletes a finished one after spec.ttlSecondsAfterFinished.
- apiGroups: ["tolaria.dev"]
  resources: ["tolariaruns"]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: ["tolaria.dev"]
  resources: ["tolariaruns/status"]
  verbs: ["patch"]
# One pod per attempt, watched for its outcome.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete"]
# The run's manifest, headless Service and NetworkPolicy: created once; read by name to see
# whether one under the run's name is the run's (its ownerReference). Never changed, never
# deleted: the garbage collector removes them with the run.
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "create"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create"]
# The run token's Secret, one per attempt under a random name: created, never read, listed,
# watched or deleted (the token is derived from the run's UID; the garbage collector removes
# the Secrets with the run).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
# Events on runs (kopf posts them).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}

{{/*
What the operator does in its own (the release) namespace, in both modes: its run-token key,
created once and then read by name. The one Secret it ever reads.
*/}}
{{- define "tolaria.keyRules" -}}
- apiGroups: [""]
  resources: ["secrets"]
  resourceNames: [{{ include "tolaria.keySecretName" . | quote }}]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
{{- end -}}

{{/* What the operator does outside any namespace, in both modes. */}}
{{- define "tolaria.clusterRules" -}}
# Incidents are cluster-scoped: created, read, escalated and resolved by the operator, and
# deleted retention.resolved_incident_ttl_seconds after their resolution.
- apiGroups: ["tolaria.dev"]
  resources: ["tolariaincidents"]
  verbs: ["get", "list", "create", "patch", "delete"]
- apiGroups: ["tolaria.dev"]
  resources: ["tolariaincidents/status"]
  verbs: ["patch"]
# kopf follows CRDs so that runs are served even when their CRD became ready after it started.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if not .Values.watch.allNamespaces }}
# kopf follows the namespaces it was given (created or deleted after it started).
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end -}}
