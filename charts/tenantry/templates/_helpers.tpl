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

{{/* ===== Runtime and evaluation mode (issue 9) ============================================ */}}

{{/*
The runtime's name; its objects carry app.kubernetes.io/name "<name>-runtime", so the operator
Deployment's selector (name + instance) never matches a runtime Pod.
*/}}
{{- define "tenantry.runtime.fullname" -}}
{{- printf "%s-runtime" (include "tenantry.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{- define "tenantry.runtime.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-runtime" (include "tenantry.name" . | trunc 55 | trimSuffix "-") }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: runtime
{{- end }}

{{- define "tenantry.runtime.labels" -}}
helm.sh/chart: {{ include "tenantry.chart" . }}
{{ include "tenantry.runtime.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tenantry
{{- end }}

{{- define "tenantry.runtime.serviceAccountName" -}}
{{- if .Values.runtime.serviceAccount.create }}
{{- default (include "tenantry.runtime.fullname" .) .Values.runtime.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.runtime.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tenantry.runtime.image" -}}
{{- printf "%s:%s" .Values.runtime.image.repository (default .Chart.AppVersion .Values.runtime.image.tag) }}
{{- end }}

{{/* The Secret the chart renders in the runtime's namespace. */}}
{{- define "tenantry.runtime.secretName" -}}
{{- include "tenantry.runtime.fullname" . }}
{{- end }}

{{/* A bundled data store's name and labels: "<fullname>-postgres", "<fullname>-redis". */}}
{{- define "tenantry.evaluation.fullname" -}}
{{- printf "%s-%s" (include "tenantry.fullname" .root | trunc 54 | trimSuffix "-") .what }}
{{- end }}

{{- define "tenantry.evaluation.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-%s" (include "tenantry.name" .root | trunc 54 | trimSuffix "-") .what }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .what }}
{{- end }}

{{- define "tenantry.evaluation.labels" -}}
helm.sh/chart: {{ include "tenantry.chart" .root }}
{{ include "tenantry.evaluation.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: tenantry
tenantry.dev/evaluation-only: "true"
{{- end }}

{{- define "tenantry.evaluation.secretName" -}}
{{- printf "%s-evaluation" (include "tenantry.fullname" . | trunc 52 | trimSuffix "-") }}
{{- end }}

{{/*
The evaluation mode's passwords as JSON, generated once per render (kept in .Values so that
every template sees the same ones) and taken from the live Secret on upgrades, so that a
`helm upgrade` never changes a password the database was initialised with.
*/}}
{{- define "tenantry.evaluation.passwords" -}}
{{- if not (hasKey .Values "tenantryGeneratedPasswords") }}
{{- $live := (lookup "v1" "Secret" .Release.Namespace (include "tenantry.evaluation.secretName" .)).data | default dict }}
{{- $passwords := dict }}
{{- range $key := list "postgres-password" "runtime-password" "redis-password" }}
{{- $_ := set $passwords $key (get $live $key | b64dec | default (randAlphaNum 32)) }}
{{- end }}
{{- $_ := set .Values "tenantryGeneratedPasswords" $passwords }}
{{- end }}
{{- toJson .Values.tenantryGeneratedPasswords }}
{{- end }}

{{/* DSN of the bundled Postgres for a login: (dict "root" $ "user" "postgres" "password" pw). */}}
{{- define "tenantry.evaluation.dsn" -}}
{{- printf "postgresql://%s:%s@%s.%s.svc:5432/tenantry" .user .password (include "tenantry.evaluation.fullname" (dict "root" .root "what" "postgres")) .root.Release.Namespace }}
{{- end }}

{{- define "tenantry.evaluation.redisUrl" -}}
{{- printf "redis://:%s@%s.%s.svc:6379/0" .password (include "tenantry.evaluation.fullname" (dict "root" .root "what" "redis")) .root.Release.Namespace }}
{{- end }}

{{/*
The runtime's connection settings, as (Secret name, key) per variable, in JSON; "" when unset.
One place decides, for the Deployment's env and for what the runtime Secret must hold.
*/}}
{{- define "tenantry.runtime.sources" -}}
{{- $v := .Values }}
{{- $rt := $v.runtime }}
{{- $own := include "tenantry.runtime.secretName" . }}
{{- $sameNamespace := eq $v.runtimeNamespace.name .Release.Namespace }}
{{- $out := dict }}
{{- range $what := list "database" "redis" }}
{{- $conn := get $rt $what }}
{{- if and $conn.existingSecret $conn.url }}
{{- fail (printf "runtime.%s: set either url or existingSecret, not both" $what) }}
{{- end }}
{{- end }}
{{- if and $rt.upstream.existingSecret $rt.upstream.apiKey }}
{{- fail "runtime.upstream: set either apiKey or existingSecret, not both" }}
{{- end }}
{{- /* Postgres: the runtime's own login. */}}
{{- if $rt.database.existingSecret }}
{{- $_ := set $out "TENANTRY_RUNTIME_DATABASE_URL" (list $rt.database.existingSecret $rt.database.existingSecretKey) }}
{{- else if or $rt.database.url $v.evaluation.enabled }}
{{- $_ := set $out "TENANTRY_RUNTIME_DATABASE_URL" (list $own "database-url") }}
{{- end }}
{{- /* Redis: its own, else the operator's. */}}
{{- if $rt.redis.existingSecret }}
{{- $_ := set $out "TENANTRY_RUNTIME_REDIS_URL" (list $rt.redis.existingSecret $rt.redis.existingSecretKey) }}
{{- else if or $rt.redis.url $v.evaluation.enabled }}
{{- $_ := set $out "TENANTRY_RUNTIME_REDIS_URL" (list $own "redis-url") }}
{{- else if $v.redis.existingSecret }}
{{- if not $sameNamespace }}
{{- fail (printf "runtime.redis.existingSecret: the runtime runs in namespace %s and cannot read Secret %s of namespace %s; create a Secret with the Redis URL there and name it here" $v.runtimeNamespace.name $v.redis.existingSecret .Release.Namespace) }}
{{- end }}
{{- $_ := set $out "TENANTRY_RUNTIME_REDIS_URL" (list $v.redis.existingSecret $v.redis.existingSecretKey) }}
{{- else if $v.redis.url }}
{{- $_ := set $out "TENANTRY_RUNTIME_REDIS_URL" (list $own "redis-url") }}
{{- end }}
{{- if $rt.upstream.existingSecret }}
{{- $_ := set $out "TENANTRY_RUNTIME_UPSTREAM_API_KEY" (list $rt.upstream.existingSecret $rt.upstream.existingSecretKey) }}
{{- else if $rt.upstream.apiKey }}
{{- $_ := set $out "TENANTRY_RUNTIME_UPSTREAM_API_KEY" (list $own "upstream-api-key") }}
{{- end }}
{{- if $rt.metricsToken.existingSecret }}
{{- $_ := set $out "TENANTRY_RUNTIME_METRICS_TOKEN" (list $rt.metricsToken.existingSecret $rt.metricsToken.existingSecretKey) }}
{{- end }}
{{- if $rt.embeddings.existingSecret }}
{{- $_ := set $out "TENANTRY_RUNTIME_EMBEDDINGS_API_KEY" (list $rt.embeddings.existingSecret $rt.embeddings.existingSecretKey) }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* The runtime Secret's data (key -> value), JSON; empty when nothing is chart-managed. */}}
{{- define "tenantry.runtime.secretData" -}}
{{- $v := .Values }}
{{- $rt := $v.runtime }}
{{- $data := dict }}
{{- if $v.evaluation.enabled }}
{{- $pw := include "tenantry.evaluation.passwords" . | fromJson }}
{{- $_ := set $data "database-url" (include "tenantry.evaluation.dsn" (dict "root" . "user" "tenantry_runtime" "password" (get $pw "runtime-password"))) }}
{{- $_ := set $data "redis-url" (include "tenantry.evaluation.redisUrl" (dict "root" . "password" (get $pw "redis-password"))) }}
{{- end }}
{{- with $rt.database.url }}{{ $_ := set $data "database-url" . }}{{ end }}
{{- if $rt.redis.url }}
{{- $_ := set $data "redis-url" $rt.redis.url }}
{{- else if and $v.redis.url (not $rt.redis.existingSecret) (not $v.redis.existingSecret) (not $v.evaluation.enabled) }}
{{- $_ := set $data "redis-url" $v.redis.url }}
{{- end }}
{{- with $rt.upstream.apiKey }}{{ $_ := set $data "upstream-api-key" . }}{{ end }}
{{- toJson $data }}
{{- end }}

{{/* An env entry from (list secret key). */}}
{{- define "tenantry.secretKeyEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ index .ref 0 }}
      key: {{ index .ref 1 }}
{{- end }}

{{- define "tenantry.runtime.pricesName" -}}
{{- printf "%s-runtime-prices" (include "tenantry.fullname" . | trunc 48 | trimSuffix "-") }}
{{- end }}

{{- define "tenantry.evaluation.initName" -}}
{{- printf "%s-postgres-init" (include "tenantry.fullname" . | trunc 49 | trimSuffix "-") }}
{{- end }}

{{/* ===== Evaluation NetworkPolicies and the usage export (chartops) ======================= */}}

{{/*
The env entry of the operator's admin DSN (the bundled Postgres's superuser in evaluation mode,
else database.existingSecret or the chart's copy of database.url); nothing when none is set.
One place for the operator's Deployment and the usage export's CronJob, which reads every
tenant's usage and so needs the same login. Call with (dict "env" NAME "root" $).
*/}}
{{- define "tenantry.adminDatabaseEnv" -}}
{{- $v := .root.Values }}
{{- if $v.evaluation.enabled }}
{{- include "tenantry.secretKeyEnv" (dict "name" .env "ref" (list (include "tenantry.evaluation.secretName" .root) "database-url")) }}
{{- else }}
{{- include "tenantry.secretEnv" (dict "env" .env "conn" $v.database "key" "database-url" "what" "database" "root" .root) }}
{{- end }}
{{- end }}

{{/*
The usage export's name: a CronJob name may be 52 characters at most (its Jobs add 11), so the
full name is cut to 39 before "-usage-export".
*/}}
{{- define "tenantry.usageExport.fullname" -}}
{{- printf "%s-usage-export" (include "tenantry.fullname" . | trunc 39 | trimSuffix "-") }}
{{- end }}

{{- define "tenantry.usageExport.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-usage-export" (include "tenantry.name" . | trunc 50 | trimSuffix "-") }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: usage-export
{{- end }}

{{- define "tenantry.usageExport.labels" -}}
helm.sh/chart: {{ include "tenantry.chart" . }}
{{ include "tenantry.usageExport.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tenantry
{{- end }}
