{{/*
Names. The prefix is cut to 40 characters (not the usual 63) so that
"<prefix>-worker-<ordinal>" stays a valid DNS label for any worker count.
*/}}
{{- define "bros.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "bros.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels on every object; "bros.componentLabels" adds the component. */}}
{{- define "bros.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "bros.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: bros
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "scheduler"). */}}
{{- define "bros.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bros.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "bros.componentLabels" -}}
{{ include "bros.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Object names. */}}
{{- define "bros.schedulerName" -}}{{ include "bros.fullname" . }}-scheduler{{- end }}
{{- define "bros.workerName" -}}{{ include "bros.fullname" . }}-worker{{- end }}
{{- define "bros.workerHeadlessName" -}}{{ include "bros.fullname" . }}-worker-headless{{- end }}
{{- define "bros.redisName" -}}{{ include "bros.fullname" . }}-redis{{- end }}
{{- define "bros.jaegerName" -}}{{ include "bros.fullname" . }}-jaeger{{- end }}
{{- define "bros.envName" -}}{{ include "bros.fullname" . }}-env{{- end }}
{{- define "bros.serviceAccountName" -}}{{ include "bros.fullname" . }}{{- end }}
{{- define "bros.authSecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "bros.fullname" .)) }}
{{- end }}

{{/*
The workers' stable addresses, comma-separated, in ordinal order: each StatefulSet pod
has the DNS name <pod>.<headless service>.<namespace>.svc.<cluster domain>.
*/}}
{{- define "bros.workerAddresses" -}}
{{- $addrs := list }}
{{- $sts := include "bros.workerName" . }}
{{- $svc := include "bros.workerHeadlessName" . }}
{{- range $i := until (int .Values.worker.replicas) }}
{{- $addrs = append $addrs (printf "%s-%d.%s.%s.svc.%s:%d" $sts $i $svc $.Release.Namespace $.Values.clusterDomain (int $.Values.worker.port)) }}
{{- end }}
{{- join "," $addrs }}
{{- end }}

{{/* The Redis URL the scheduler is given. */}}
{{- define "bros.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s.%s.svc.%s:%d/0" (include "bros.redisName" .) .Release.Namespace .Values.clusterDomain (int .Values.redis.port) }}
{{- else }}
{{- required "externalRedis.url is required when redis.enabled is false" .Values.externalRedis.url }}
{{- end }}
{{- end }}

{{/* The Redis password Secret as (dict "name" "key"), or empty names when there is none. */}}
{{- define "bros.redisPasswordSecretName" -}}
{{- if .Values.redis.enabled }}{{ .Values.redis.auth.existingSecret }}{{ else }}{{ .Values.externalRedis.passwordSecret.name }}{{ end }}
{{- end }}
{{- define "bros.redisPasswordSecretKey" -}}
{{- if .Values.redis.enabled }}{{ .Values.redis.auth.secretKey }}{{ else }}{{ .Values.externalRedis.passwordSecret.key }}{{ end }}
{{- end }}

{{/*
The OTLP endpoint: tracing.endpoint, else the bundled Jaeger (4317 for grpc, 4318 for
http), else "" (tracing off).
*/}}
{{- define "bros.otlpEndpoint" -}}
{{- if .Values.tracing.enabled }}
{{- if .Values.tracing.endpoint }}
{{- .Values.tracing.endpoint }}
{{- else if .Values.jaeger.enabled }}
{{- printf "http://%s.%s.svc.%s:%d" (include "bros.jaegerName" .) .Release.Namespace .Values.clusterDomain (ternary 4317 4318 (eq .Values.tracing.protocol "grpc")) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Flags shared by scheduler and worker: drain, metrics, tracing. Arg: (dict "ctx" $ "service" "bros-scheduler"). */}}
{{- define "bros.commonArgs" -}}
{{- $v := .ctx.Values }}
- --host=0.0.0.0
- --drain-grace-s={{ $v.drainGraceS }}
- --metrics-port={{ ternary $v.metrics.port 0 $v.metrics.enabled }}
{{- $otlp := include "bros.otlpEndpoint" .ctx }}
{{- if $otlp }}
- --otlp-endpoint={{ $otlp }}
- --otlp-protocol={{ $v.tracing.protocol }}
- --trace-sample-ratio={{ $v.tracing.sampleRatio }}
- --service-name={{ .service }}
{{- end }}
{{- end }}

{{/*
Probes of a bros container. Kubelet's native gRPC probe (grpc.health.v1) checks a named
health service; it cannot speak TLS, so a server with TLS gets TCP probes on the same port.
Arg: (dict "probes" .Values.x.probes "port" N "tls" bool).
*/}}
{{- define "bros.probes" -}}
{{- range $kind := list "startup" "readiness" "liveness" }}
{{- $p := index $.probes $kind }}
{{ $kind }}Probe:
  {{- if $.tls }}
  tcpSocket:
    port: grpc
  {{- else }}
  grpc:
    port: {{ $.port }}
    service: {{ $p.service | quote }}
  {{- end }}
  periodSeconds: {{ $p.periodSeconds }}
  failureThreshold: {{ $p.failureThreshold }}
  timeoutSeconds: 3
{{- end }}
{{- end }}

{{/* preStop waits, then Kubernetes sends SIGTERM and the process drains. */}}
{{- define "bros.lifecycle" -}}
lifecycle:
  preStop:
    exec:
      command: ["sleep", "{{ .Values.preStopDelayS }}"]
{{- end }}

{{- define "bros.terminationGracePeriodSeconds" -}}
{{- add .Values.preStopDelayS .Values.drainGraceS .Values.terminationMarginS }}
{{- end }}

{{/* Security context of the bros containers: the images run as uid 10001. */}}
{{- define "bros.containerSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  allowPrivilegeEscalation: false
  capabilities:
    drop: ["ALL"]
{{- end }}

{{/* Checksum of the env ConfigMap: a config change rolls the pods. */}}
{{- define "bros.envChecksum" -}}
checksum/env: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end }}
