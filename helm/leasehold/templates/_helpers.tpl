{{- define "leasehold.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "leasehold.fullname" -}}
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

{{- define "leasehold.selectorLabels" -}}
app.kubernetes.io/name: {{ include "leasehold.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "leasehold.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "leasehold.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: leasehold
{{- end -}}

{{- define "leasehold.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "leasehold.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "leasehold.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "leasehold.cluster" -}}
{{- default .Release.Name .Values.cluster -}}
{{- end -}}

{{/* etcd endpoints: the dev etcd when enabled, else the configured ones. */}}
{{- define "leasehold.etcdEndpoints" -}}
{{- if .Values.etcd.dev.enabled -}}
{{- list (printf "http://%s-etcd:2379" (include "leasehold.fullname" .)) | toJson -}}
{{- else -}}
{{- .Values.etcd.endpoints | toJson -}}
{{- end -}}
{{- end -}}

{{/* Termination grace: must exceed the drain timeout so the drain can finish. */}}
{{- define "leasehold.terminationGrace" -}}
{{- $drain := int .Values.drainTimeoutSeconds -}}
{{- $grace := int .Values.terminationGracePeriodSeconds -}}
{{- if eq $grace 0 -}}
{{- add $drain (int .Values.leaseTTLSeconds) (mul 2 (int .Values.shardEventTimeoutSeconds)) 15 -}}
{{- else if le $grace $drain -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed drainTimeoutSeconds (%d), or a terminating pod is killed mid-drain" $grace $drain) -}}
{{- else -}}
{{- $grace -}}
{{- end -}}
{{- end -}}

{{/* http or https: the scheme of the admin plane (probes, preStop, scraping). */}}
{{- define "leasehold.adminScheme" -}}
{{- if .Values.tls.enabled -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{/* The Secret of a plane's certificate: (list $ "client"|"peer"|"admin"). */}}
{{- define "leasehold.tlsSecret" -}}
{{- $root := index . 0 -}}
{{- $plane := index . 1 -}}
{{- if $root.Values.tls.certManager.enabled -}}
{{- printf "%s-%s" (include "leasehold.fullname" $root) $plane -}}
{{- else -}}
{{- index $root.Values.tls.secrets $plane -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the admin token (key `token`). */}}
{{- define "leasehold.adminTokenSecret" -}}
{{- default (printf "%s-admin-token" (include "leasehold.fullname" .)) .Values.adminAuth.tokenSecret -}}
{{- end -}}

{{/* etcd TLS applies to an external etcd (the dev etcd is plain http). */}}
{{- define "leasehold.etcdTLS" -}}
{{- if and .Values.etcd.tls.secretName (not .Values.etcd.dev.enabled) -}}true{{- end -}}
{{- end -}}

{{/* Sorted names of a Kafka source's secretProperties (their env vars are numbered in this order). */}}
{{- define "leasehold.kafkaSecretNames" -}}
{{- keys (default dict .secretProperties) | sortAlpha | toJson -}}
{{- end -}}

{{/* Values that cannot be rendered into a working release: fail with what to set. */}}
{{- define "leasehold.validate" -}}
{{- if and (eq .Values.handler.type "sidecar") (not .Values.handler.sidecar.image.repository) -}}
{{- fail "handler.type is sidecar: set handler.sidecar.image.repository to your EntityHandler application's image" -}}
{{- end -}}
{{- $p := .Values.ports -}}
{{- if or (eq (int $p.grpc) (int $p.admin)) (eq (int $p.grpc) (int $p.peer)) (eq (int $p.admin) (int $p.peer)) -}}
{{- fail (printf "ports.grpc (%d), ports.admin (%d) and ports.peer (%d) must differ: each plane has its own port" (int $p.grpc) (int $p.admin) (int $p.peer)) -}}
{{- end -}}
{{- if and .Values.httpGateway.enabled (has (int .Values.httpGateway.port) (list (int $p.grpc) (int $p.admin) (int $p.peer))) -}}
{{- fail (printf "httpGateway.port (%d) must differ from ports.grpc, ports.admin and ports.peer" (int .Values.httpGateway.port)) -}}
{{- end -}}
{{- if and .Values.tls.clientAuth (not .Values.tls.enabled) -}}
{{- fail "tls.clientAuth needs tls.enabled: without TLS the client plane cannot check client certificates" -}}
{{- end -}}
{{- if .Values.tls.enabled -}}
{{- if .Values.tls.certManager.enabled -}}
{{- with .Values.tls.certManager.issuerRef -}}
{{- if not .name -}}
{{- fail "tls.certManager.issuerRef: set name (and kind: ClusterIssuer for a cluster-wide issuer), or leave it {} for the release's self-signed CA" -}}
{{- end -}}
{{- end -}}
{{- else -}}
{{- $s := .Values.tls.secrets -}}
{{- if or (not $s.client) (not $s.peer) (not $s.admin) -}}
{{- fail "tls.enabled with tls.certManager.enabled false: set tls.secrets.client, tls.secrets.peer and tls.secrets.admin (Secrets with tls.crt, tls.key and ca.crt), or set tls.certManager.enabled or tls.enabled false" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if not .Values.etcd.dev.enabled -}}
{{- $https := 0 -}}
{{- range .Values.etcd.endpoints -}}
{{- if hasPrefix "https://" . -}}{{- $https = add1 $https -}}{{- end -}}
{{- end -}}
{{- if and $https (ne (int $https) (len .Values.etcd.endpoints)) -}}
{{- fail "etcd.endpoints: use https:// for all of them or for none" -}}
{{- end -}}
{{- if and $https (not .Values.etcd.tls.secretName) -}}
{{- fail "etcd.endpoints use https://: set etcd.tls.secretName (a Secret with etcd's ca.crt)" -}}
{{- end -}}
{{- if and (not $https) .Values.etcd.tls.secretName -}}
{{- fail "etcd.tls.secretName is set: the etcd.endpoints must use https://" -}}
{{- end -}}
{{- end -}}
{{- range $i, $k := .Values.kafka.sources -}}
{{- range $name, $_ := $k.properties -}}
{{- if or (hasPrefix "sasl.password" $name) (hasPrefix "ssl.key.password" $name) (hasPrefix "ssl.keystore.password" $name) -}}
{{- fail (printf "kafka.sources[%d].properties.%s is a password: move it to kafka.sources[%d].secretProperties (a Secret name and key), so it never sits in the ConfigMap" $i $name $i) -}}
{{- end -}}
{{- if hasKey (default dict $k.secretProperties) $name -}}
{{- fail (printf "kafka.sources[%d]: %s is in both properties and secretProperties" $i $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
