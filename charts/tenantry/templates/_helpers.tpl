{{/*
Chart name, overridable; truncated to 63 characters (the DNS label limit of Kubernetes names).
*/}}
{{- define "tenantry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: the release name, suffixed with the chart name unless it already
contains it; truncated to 63 characters because some Kubernetes name fields are limited to that.
*/}}
{{- define "tenantry.fullname" -}}
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

{{/*
Chart name and version, as used by the helm.sh/chart label.
*/}}
{{- define "tenantry.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Standard labels, on every object the chart renders.
*/}}
{{- define "tenantry.labels" -}}
helm.sh/chart: {{ include "tenantry.chart" . }}
{{ include "tenantry.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tenantry
{{- end }}

{{/*
Selector labels: a Deployment's selector is immutable, so nothing here may change after install
(no version, no chart label).
*/}}
{{- define "tenantry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tenantry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The ServiceAccount the operator runs as.
*/}}
{{- define "tenantry.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tenantry.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The operator image; the tag defaults to the chart's appVersion.
*/}}
{{- define "tenantry.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The silo Postgres image the operator puts into every silo tenant's StatefulSet.
*/}}
{{- define "tenantry.siloImage" -}}
{{- printf "%s:%s" .Values.silo.image.repository .Values.silo.image.tag }}
{{- end }}

{{/*
The Secret the chart creates for connection strings given as plain values.
*/}}
{{- define "tenantry.secretName" -}}
{{- include "tenantry.fullname" . }}
{{- end }}

{{/*
Whether the chart renders its own Secret: some connection string was given as a value.
*/}}
{{- define "tenantry.createSecret" -}}
{{- if or (and .Values.database.url (not .Values.database.existingSecret)) (and .Values.redis.url (not .Values.redis.existingSecret)) .Values.silo.dsnOverrides }}true{{ end }}
{{- end }}

{{/*
An env entry read from a Secret: the user's existing one, else the chart's. Renders nothing
when neither is configured, so the operator reports NoDatabaseConfigured / NoRedisConfigured.
Call with (dict "env" "TENANTRY_DATABASE_URL" "conn" .Values.database "key" "database-url"
"what" "database" "root" $).
*/}}
{{- define "tenantry.secretEnv" -}}
{{- $conn := .conn }}
{{- if and $conn.existingSecret $conn.url }}
{{- fail (printf "%s: set either %s.url or %s.existingSecret, not both" .what .what .what) }}
{{- end }}
{{- if $conn.existingSecret }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ $conn.existingSecret }}
      key: {{ $conn.existingSecretKey }}
{{- else if $conn.url }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ include "tenantry.secretName" .root }}
      key: {{ .key }}
{{- end }}
{{- end }}
