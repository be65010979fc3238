{{/*
The chart name, or nameOverride. It is also the app.kubernetes.io/name label, by which
`claw-secrets invoke` finds agent pods (app.kubernetes.io/name=claw-secrets).
*/}}
{{- define "claw-secrets.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name: fullnameOverride, else the release name if it already
contains the chart name, else "<release>-<chart name>". Release "claw-secrets" gives the
names of deploy/rbac/ (claw-secrets-operator, claw-secrets-editor, ...).
*/}}
{{- define "claw-secrets.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<fullname>-<suffix>", at most 63 characters. Call with (list . "suffix"). */}}
{{- define "claw-secrets.component" -}}
{{- $ctx := index . 0 }}
{{- printf "%s-%s" (include "claw-secrets.fullname" $ctx) (index . 1) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "claw-secrets.operatorName" -}}
{{- include "claw-secrets.component" (list . "operator") }}
{{- end }}

{{- define "claw-secrets.agentName" -}}
{{- include "claw-secrets.component" (list . "agent") }}
{{- end }}

{{/*
The master key Secret both the operator (--master-key-secret NAME, in its namespace) and the
agents (--master-key-secret NAMESPACE/NAME) use: masterKey.existingSecret, else the Secret the
operator creates on first start.
*/}}
{{- define "claw-secrets.masterKeySecret" -}}
{{- if .Values.masterKey.existingSecret }}
{{- .Values.masterKey.existingSecret }}
{{- else }}
{{- include "claw-secrets.component" (list . "master-key") }}
{{- end }}
{{- end }}

{{- define "claw-secrets.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. Call with (list . "component"). */}}
{{- define "claw-secrets.labels" -}}
{{- $ctx := index . 0 -}}
helm.sh/chart: {{ include "claw-secrets.chart" $ctx }}
{{ include "claw-secrets.selectorLabels" . }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
app.kubernetes.io/part-of: claw-secrets
{{- end }}

{{/* Selector labels of a component's pods. Call with (list . "component"). */}}
{{- define "claw-secrets.selectorLabels" -}}
{{- $ctx := index . 0 -}}
app.kubernetes.io/name: {{ include "claw-secrets.name" $ctx }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* The image: repository@digest when a digest is given, else repository:tag (default: appVersion). */}}
{{- define "claw-secrets.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The pod-level security context of the operator and the agent. */}}
{{- define "claw-secrets.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The container security context of the operator and the agent. */}}
{{- define "claw-secrets.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
The admission webhook's names. The Service "<fullname>-webhook" (also the name of the
cert-manager Certificate), the MutatingWebhookConfiguration "<fullname>" (cluster-scoped), the
Secret the operator keeps its own CA and serving certificate in (managed mode) and the one
cert-manager writes (cert-manager mode).
*/}}
{{- define "claw-secrets.webhookService" -}}
{{- include "claw-secrets.component" (list . "webhook") }}
{{- end }}

{{- define "claw-secrets.webhookConfiguration" -}}
{{- include "claw-secrets.fullname" . }}
{{- end }}

{{- define "claw-secrets.webhookTlsSecret" -}}
{{- include "claw-secrets.component" (list . "webhook-tls") }}
{{- end }}

{{- define "claw-secrets.webhookCertManagerSecret" -}}
{{- include "claw-secrets.component" (list . "webhook-cert") }}
{{- end }}

{{/* The names the API server may call the webhook's Service by: what its certificate covers. */}}
{{- define "claw-secrets.webhookHosts" -}}
{{- $svc := include "claw-secrets.webhookService" . -}}
{{- $ns := .Release.Namespace -}}
{{- printf "%s,%s.%s,%s.%s.svc,%s.%s.svc.cluster.local" $svc $svc $ns $svc $ns $svc $ns }}
{{- end }}

{{/*
"true" when the webhook is on and the operator manages its certificate itself (the default:
it needs the certificate Secret and the MutatingWebhookConfiguration's caBundle); empty
otherwise (webhook off, or cert-manager mode).
*/}}
{{- define "claw-secrets.webhookManaged" -}}
{{- if and .Values.webhook.enabled (not .Values.webhook.certManager.enabled) }}true{{ end }}
{{- end }}

{{/*
The agent's gateway principal (agent.gateway.principal, NAMESPACE/NAME) when agent.gateway.url
is set, where it is required; empty otherwise. Also refuses what the agent would refuse at
start: a gateway key without url, a CA for a plain ws:// gateway, and no way to pair a new node
(neither the gateway token nor a setup code).
*/}}
{{- define "claw-secrets.gatewayPrincipal" -}}
{{- $g := .Values.agent.gateway -}}
{{- if $g.url -}}
{{- if and $g.caConfigMap (not (hasPrefix "wss://" $g.url)) -}}
{{- fail "agent.gateway.caConfigMap needs a wss:// agent.gateway.url (a CA verifies TLS, and ws:// has none)" -}}
{{- end -}}
{{- $principal := required "agent.gateway.principal is required with agent.gateway.url: the ServiceAccount, as NAMESPACE/NAME, that every call through the gateway acts as (the gateway does not pass on who its callers are)" $g.principal -}}
{{- if not (or $g.tokenSecret $g.setupCodeSecret) -}}
{{- fail "agent.gateway.url needs agent.gateway.tokenSecret or agent.gateway.setupCodeSecret: a new node pairs with the gateway's token or a setup code (then with the device token it saves in agent.hostPath)" -}}
{{- end -}}
{{- $principal -}}
{{- else -}}
{{- range $key := list "principal" "tokenSecret" "setupCodeSecret" "caConfigMap" -}}
{{- if index $g $key -}}
{{- fail (printf "agent.gateway.%s needs agent.gateway.url (the gateway's ws:// or wss:// URL)" $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end }}
