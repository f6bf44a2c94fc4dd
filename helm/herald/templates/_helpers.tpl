{{/* Names. */}}
{{- define "herald.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "herald.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "herald.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "herald.registry" -}}{{ include "herald.fullname" . | trunc 54 | trimSuffix "-" }}-registry{{- end -}}
{{- define "herald.registryHeadless" -}}{{ include "herald.registry" . }}-headless{{- end -}}
{{- define "herald.edge" -}}{{ include "herald.fullname" . | trunc 58 | trimSuffix "-" }}-edge{{- end -}}

{{/* Standard labels (app.kubernetes.io/*), and the selector subset. */}}
{{- define "herald.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "herald.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: herald
{{- end -}}

{{- define "herald.selectorLabels" -}}
app.kubernetes.io/name: {{ include "herald.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "herald.image" -}}
{{- with .Values.image.registry }}{{ . }}/{{ end }}{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "herald.secretName" -}}
{{- default (printf "%s-secrets" (include "herald.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "herald.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "herald.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Registry members' addresses, by stable pod DNS name: id=host:port,... and host:port,... */}}
{{- define "herald.registryPeers" -}}
{{- $members := list -}}
{{- range $i := until (int .Values.registry.replicas) -}}
{{- $members = append $members (printf "%d=%s-%d.%s.%s.svc.%s:%d" $i (include "herald.registry" $) $i (include "herald.registryHeadless" $) (include "herald.namespace" $) $.Values.clusterDomain (int $.Values.registry.grpcPort)) -}}
{{- end -}}
{{- join "," $members -}}
{{- end -}}

{{- define "herald.registryAddrs" -}}
{{- $members := list -}}
{{- range $i := until (int .Values.registry.replicas) -}}
{{- $members = append $members (printf "%s-%d.%s.%s.svc.%s:%d" (include "herald.registry" $) $i (include "herald.registryHeadless" $) (include "herald.namespace" $) $.Values.clusterDomain (int $.Values.registry.grpcPort)) -}}
{{- end -}}
{{- join "," $members -}}
{{- end -}}

{{/* The edges' herald.yaml: the chart's settings, then the user's `config` over them. */}}
{{- define "herald.edgeConfig" -}}
{{- $chart := dict
  "server-host" "0.0.0.0"
  "server-port" (int .Values.edge.httpPort)
  "grpc-port" (int .Values.edge.grpcPort)
  "shutdown" (dict "drain-delay-ms" (int .Values.edge.drainDelayMs) "drain-timeout-ms" (int .Values.edge.drainTimeoutMs))
  "admin" (dict "host" "127.0.0.1" "port" 7073)
-}}
{{- toYaml (mergeOverwrite $chart (deepCopy .Values.config)) -}}
{{- end -}}

{{/* Whether the edges verify HS256 JWTs with the Secret's jwt-secret. */}}
{{- define "herald.jwtSecretUsed" -}}
{{- $auth := .Values.config.auth | default dict -}}
{{- if or (eq (toString (get $auth "method")) "jwt") .Values.secrets.jwtSecret -}}true{{- end -}}
{{- end -}}
