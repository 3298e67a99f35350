{{/*
Numbers: Helm reads every number in values.yaml as a float64 and prints a large one as
1.048576e+06, which the services' flag parsers refuse (a crash-looping pod). Every number printed
into a manifest goes through `int64`; tests/chart/test_chart.py renders with large values and fails
on any float.
*/}}

{{- define "tensortrace.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tensortrace.fullname" -}}
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

{{/* "<fullname>-<component>", within 63 characters. Call with (list $ "loader"). */}}
{{- define "tensortrace.componentName" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s" (include "tensortrace.fullname" $root | trunc (int (sub 62 (len (index . 1))))) (index . 1) | trimSuffix "-" -}}
{{- end -}}

{{- define "tensortrace.labels" -}}
app.kubernetes.io/name: {{ include "tensortrace.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tensortrace
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of one component's objects. Call with (list $ "loader"). */}}
{{- define "tensortrace.componentLabels" -}}
{{ include "tensortrace.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* Selector labels of one component. Call with (list $ "loader"). */}}
{{- define "tensortrace.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tensortrace.name" (index . 0) }}
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "tensortrace.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tensortrace.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* An image reference. Call with (list $ .Values.images.exporter). */}}
{{- define "tensortrace.image" -}}
{{- $root := index . 0 -}}
{{- $img := index . 1 -}}
{{- printf "%s:%s" $img.repository (toString (default $root.Chart.AppVersion $img.tag)) -}}
{{- end -}}

{{/* "true" when ClickHouse is the embedded engine (chdb://) in the loader process. */}}
{{- define "tensortrace.embedded" -}}
{{- if hasPrefix "chdb://" .Values.clickhouse.dsn -}}true{{- end -}}
{{- end -}}

{{/* The embedded engine's directory (chdb:///var/lib/x -> /var/lib/x); the volume is mounted there. */}}
{{- define "tensortrace.chdbPath" -}}
{{- trimPrefix "chdb://" .Values.clickhouse.dsn -}}
{{- end -}}

{{/* Refusals: configurations that would render but cannot run. */}}
{{- define "tensortrace.validate" -}}
{{- if include "tensortrace.embedded" . -}}
{{- if gt (int64 .Values.loader.replicas) 1 -}}
{{- fail (printf "loader.replicas=%d with clickhouse.dsn=%s: an embedded chDB engine is one process on one volume; use a ClickHouse server (http(s)://host:8123) to run more than one loader" (int64 .Values.loader.replicas) .Values.clickhouse.dsn) -}}
{{- end -}}
{{- if eq .Values.clickhouse.dsn "chdb://memory" -}}
{{- fail "clickhouse.dsn=chdb://memory keeps nothing across a restart and no other process can read it; use chdb:///var/lib/tensortrace/chdb" -}}
{{- end -}}
{{- if not (hasPrefix "/" (include "tensortrace.chdbPath" .)) -}}
{{- fail (printf "clickhouse.dsn=%s: an embedded engine needs an absolute path, chdb:///var/lib/tensortrace/chdb" .Values.clickhouse.dsn) -}}
{{- end -}}
{{- if and .Values.bridge.enabled .Values.bridge.otlpEndpoint -}}
{{- fail "bridge.otlpEndpoint needs a ClickHouse server: with chdb:// the bridge runs inside the loader and writes otel_traces into its engine only" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.kafka.sasl.mechanism (not (hasPrefix "SASL_" .Values.kafka.securityProtocol)) -}}
{{- fail (printf "kafka.sasl.mechanism=%s but kafka.securityProtocol=%s uses no SASL (SASL_PLAINTEXT or SASL_SSL)" .Values.kafka.sasl.mechanism .Values.kafka.securityProtocol) -}}
{{- end -}}
{{- if hasPrefix "SASL_" .Values.kafka.securityProtocol -}}
{{- if or (not .Values.kafka.sasl.mechanism) (not .Values.kafka.sasl.username) (not .Values.kafka.sasl.existingSecret) -}}
{{- fail (printf "kafka.securityProtocol=%s needs kafka.sasl.mechanism, kafka.sasl.username and kafka.sasl.existingSecret (the Secret with the password)" .Values.kafka.securityProtocol) -}}
{{- end -}}
{{- end -}}
{{- if and (or .Values.kafka.tls.caSecret .Values.kafka.tls.clientCertSecret) (not (has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL"))) -}}
{{- fail (printf "kafka.tls secrets are set but kafka.securityProtocol=%s uses no TLS (SSL or SASL_SSL)" .Values.kafka.securityProtocol) -}}
{{- end -}}
{{- $sec := .Values.security -}}
{{- if not $sec.plaintext -}}
{{- if and $sec.tls.certManager.enabled $sec.tls.existingSecret -}}
{{- fail "security.tls: both certManager.enabled and existingSecret are set; choose one certificate source" -}}
{{- end -}}
{{- if and $sec.tls.certManager.enabled (not $sec.tls.certManager.issuerRef.name) -}}
{{- fail "security.tls.certManager.enabled=true needs security.tls.certManager.issuerRef.name (an Issuer or ClusterIssuer of cert-manager)" -}}
{{- end -}}
{{- if not (or $sec.tls.certManager.enabled $sec.tls.existingSecret) -}}
{{- fail "security: TLS is on (the default) but there is no source of certificates for the query, control and OTLP endpoints. Set security.tls.certManager.enabled=true with security.tls.certManager.issuerRef.name=<issuer>, or security.tls.existingSecret=<a Secret with tls.crt, tls.key, ca.crt>; or, for development only, security.plaintext=true (docs/security.md \"In Kubernetes\")" -}}
{{- end -}}
{{- if not $sec.tokens.existingSecret -}}
{{- fail "security: TLS without tokens lets every pod that reaches the query Service read every captured tensor. Set security.tokens.existingSecret=<a Secret whose key \"tokens\" holds `identity roles token` lines> (kubectl create secret generic tensortrace-tokens --from-file=tokens=./tokens; docs/security.md)" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.sglang.enabled .Values.sglang.trace .Values.bridge.enabled $sec.tokens.existingSecret (not $sec.ingestToken.existingSecret) -}}
{{- fail "sglang.trace sends SGLang's spans to the bridge, whose OTLP receiver requires an ingest token: set security.ingestToken.existingSecret=<a Secret whose key \"token\" holds a token with the ingest role in security.tokens>, or sglang.trace=false" -}}
{{- end -}}
{{- range $c := list "exporter" "loader" -}}
{{- $v := index $.Values $c -}}
{{- if lt (int64 $v.terminationGraceExtraSeconds) 1 -}}
{{- fail (printf "%s.terminationGraceExtraSeconds must be >= 1: the pod's grace period must exceed its drain timeout" $c) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Kafka client flags, the same for every service (KafkaConfig: `--kafka-*`). */}}
{{- define "tensortrace.kafkaArgs" -}}
- --kafka-bootstrap-servers={{ .Values.kafka.bootstrapServers }}
{{- if ne .Values.kafka.securityProtocol "PLAINTEXT" }}
- --kafka-security-protocol={{ .Values.kafka.securityProtocol }}
{{- end }}
{{- if hasPrefix "SASL_" .Values.kafka.securityProtocol }}
- --kafka-sasl-mechanism={{ .Values.kafka.sasl.mechanism }}
- --kafka-sasl-username={{ .Values.kafka.sasl.username }}
{{- end }}
{{- if has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL") }}
{{- if .Values.kafka.tls.caSecret }}
- --kafka-ssl-cafile=/etc/tensortrace/kafka-ca/{{ .Values.kafka.tls.caKey }}
{{- end }}
{{- if .Values.kafka.tls.clientCertSecret }}
- --kafka-ssl-certfile=/etc/tensortrace/kafka-client/tls.crt
- --kafka-ssl-keyfile=/etc/tensortrace/kafka-client/tls.key
{{- end }}
{{- if not .Values.kafka.tls.checkHostname }}
- --kafka-ssl-check-hostname=false
{{- end }}
{{- end }}
{{- end -}}

{{/* The SASL password (KafkaConfig reads TENSORTRACE_KAFKA_SASL_PASSWORD). */}}
{{- define "tensortrace.kafkaEnv" -}}
{{- if hasPrefix "SASL_" .Values.kafka.securityProtocol }}
- name: TENSORTRACE_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.sasl.existingSecret }}
      key: {{ .Values.kafka.sasl.passwordKey }}
{{- end }}
{{- end -}}

{{- define "tensortrace.kafkaVolumeMounts" -}}
{{- if has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL") }}
{{- if .Values.kafka.tls.caSecret }}
- name: kafka-ca
  mountPath: /etc/tensortrace/kafka-ca
  readOnly: true
{{- end }}
{{- if .Values.kafka.tls.clientCertSecret }}
- name: kafka-client
  mountPath: /etc/tensortrace/kafka-client
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{- define "tensortrace.kafkaVolumes" -}}
{{- if has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL") }}
{{- if .Values.kafka.tls.caSecret }}
- name: kafka-ca
  secret:
    secretName: {{ .Values.kafka.tls.caSecret }}
    items:
      - key: {{ .Values.kafka.tls.caKey }}
        path: {{ .Values.kafka.tls.caKey }}
{{- end }}
{{- if .Values.kafka.tls.clientCertSecret }}
- name: kafka-client
  secret:
    secretName: {{ .Values.kafka.tls.clientCertSecret }}
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
{{- end }}
{{- end }}
{{- end -}}

{{/* ClickHouse server credentials (storage.connect reads CLICKHOUSE_USER / CLICKHOUSE_PASSWORD). */}}
{{- define "tensortrace.clickhouseEnv" -}}
{{- if not (include "tensortrace.embedded" .) }}
{{- if .Values.clickhouse.username }}
- name: CLICKHOUSE_USER
  value: {{ .Values.clickhouse.username | quote }}
{{- else if .Values.clickhouse.existingSecret }}
- name: CLICKHOUSE_USER
  valueFrom:
    secretKeyRef:
      name: {{ .Values.clickhouse.existingSecret }}
      key: {{ .Values.clickhouse.usernameKey }}
      optional: true
{{- end }}
{{- if .Values.clickhouse.existingSecret }}
- name: CLICKHOUSE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.clickhouse.existingSecret }}
      key: {{ .Values.clickhouse.passwordKey }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The restricted Pod Security profile, for every TensorTrace container. */}}
{{- define "tensortrace.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* An HTTP probe on the service's `http` port, with the timing from values. Call with (list "/healthz" .Values.x.livenessProbe). */}}
{{- define "tensortrace.httpProbe" -}}
httpGet:
  path: {{ index . 0 }}
  port: http
{{- range $k, $v := index . 1 }}
{{ $k }}: {{ int64 $v }}
{{- end }}
{{- end -}}

{{/* Scheduling and pull settings of a pod. Call with (list $ .Values.loader). */}}
{{- define "tensortrace.podScheduling" -}}
{{- $root := index . 0 -}}
{{- $v := index . 1 -}}
serviceAccountName: {{ include "tensortrace.serviceAccountName" $root }}
automountServiceAccountToken: {{ $root.Values.serviceAccount.automountServiceAccountToken }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod template metadata. Call with (list $ "loader" .Values.loader). */}}
{{- define "tensortrace.podMetadata" -}}
{{- $root := index . 0 -}}
{{- $v := index . 2 -}}
labels:
  {{- include "tensortrace.componentLabels" (list $root (index . 1)) | nindent 2 }}
  {{- if eq (index . 1) "sglang" }}
  # an inference pod: networkPolicy.otlpFrom admits it to the bridge's OTLP receiver
  tensortrace.io/inference: "true"
  {{- end }}
  {{- with $v.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- if or (hasKey $v "metricsPort") $v.podAnnotations }}
annotations:
  {{- if hasKey $v "metricsPort" }}
  prometheus.io/scrape: "true"
  prometheus.io/port: {{ int64 $v.metricsPort | quote }}
  prometheus.io/path: /metrics
  {{- end }}
  {{- with $v.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/*
The capture agent's environment in an inference container (the quick-start SGLang Deployment and
deploy/sglang-capture/ carry the same variables; docs/sglang.md).
*/}}
{{- define "tensortrace.captureEnv" -}}
- name: SGLANG_PLUGINS
  value: tensortrace
- name: TENSORTRACE_RING_DIR
  value: {{ .Values.rings.hostPath | quote }}
- name: TENSORTRACE_RING_GID
  value: {{ int64 .Values.rings.groupId | quote }}
- name: TENSORTRACE_SELECTION
  value: {{ .Values.sglang.capture.selection | quote }}
- name: TENSORTRACE_RING_CAPACITY
  value: {{ .Values.sglang.capture.ringCapacity | quote }}
- name: TENSORTRACE_OVERFLOW
  value: {{ .Values.sglang.capture.overflow | quote }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
{{- end -}}

{{/* The inference pod's ring mount: only its own subdirectory of the node's ring directory, which
kubelet creates (root, the ring directory's mode: 2770 in the ring group), so the pod sees no other
pod's rings and the exporter knows whose rings these are from where they are (docs/operations.md
"Pod isolation and the threat model"). The container needs POD_NAMESPACE and POD_NAME in its env. */}}
{{- define "tensortrace.ringMount" -}}
- name: tensortrace-rings
  mountPath: {{ .Values.rings.hostPath }}
  subPathExpr: $(POD_NAMESPACE)_$(POD_NAME)
{{- end -}}

{{/* A pod's securityContext from values (numbers through int64). Call with .Values.loader.podSecurityContext. */}}
{{- define "tensortrace.podSecurityContext" -}}
runAsUser: {{ int64 .runAsUser }}
runAsGroup: {{ int64 .runAsGroup }}
{{- if hasKey . "fsGroup" }}
fsGroup: {{ int64 .fsGroup }}
{{- end }}
runAsNonRoot: true
seccompProfile:
  type: {{ .seccompProfile.type }}
{{- end -}}

{{/*
An init container for an inference pod: waits (at most 2 minutes, then goes on: inference first)
until the node's exporter has prepared the ring directory (setgid bit set, writable by this pod).
The same container is in deploy/sglang-capture/capture-patch.yaml.
*/}}
{{- define "tensortrace.waitForRingDir" -}}
- name: tensortrace-wait-ring-dir
  image: {{ include "tensortrace.image" (list . .Values.sglang.image) }}
  command:
    - /bin/sh
    - -c
    - |
      for i in $(seq 1 60); do
        [ -g "$TENSORTRACE_RING_DIR" ] && [ -w "$TENSORTRACE_RING_DIR" ] && exit 0
        sleep 2
      done
      echo "tensortrace - $TENSORTRACE_RING_DIR is not prepared by the exporter yet; starting anyway (no capture until it is)"
  env:
    - name: TENSORTRACE_RING_DIR
      value: {{ .Values.rings.hostPath | quote }}
    - name: POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    - name: POD_NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
  volumeMounts:
    {{- include "tensortrace.ringMount" . | nindent 4 }}
{{- end -}}


{{/*
Endpoint security flags (service/security.py EndpointSecurity; docs/security.md). Call with
(list $ "<flag prefix with its dash, or empty>" <listens beyond loopback> <TLS possible> <mTLS applies>).
Plaintext only with security.plaintext (or for the OTLP receiver, whose SGLang client cannot do
TLS, unless security.otlpReceiverTLS); tokens whenever security.tokens.existingSecret is set.
*/}}
{{- define "tensortrace.endpointArgs" -}}
{{- $root := index . 0 -}}
{{- $p := index . 1 -}}
{{- $sec := $root.Values.security -}}
{{- if and (not $sec.plaintext) (index . 3) }}
- --{{ $p }}tls-cert=/etc/tensortrace/tls/tls.crt
- --{{ $p }}tls-key=/etc/tensortrace/tls/tls.key
{{- if and $sec.tls.clientCA (index . 4) }}
- --{{ $p }}tls-client-ca=/etc/tensortrace/tls/ca.crt
{{- end }}
{{- else }}
- --{{ $p }}plaintext
{{- if index . 2 }}
- --{{ $p }}plaintext-any-address
{{- end }}
{{- end }}
{{- if $sec.tokens.existingSecret }}
- --{{ $p }}token-file=/etc/tensortrace/tokens/tokens
{{- end }}
{{- end -}}

{{/* "true" when the OTLP receiver serves TLS. */}}
{{- define "tensortrace.otlpTLS" -}}
{{- if and (not .Values.security.plaintext) .Values.security.otlpReceiverTLS -}}true{{- end -}}
{{- end -}}

{{/* The server certificate Secret of a component: (list $ "exporter") or (list $ "query"). */}}
{{- define "tensortrace.tlsSecretName" -}}
{{- $root := index . 0 -}}
{{- $tls := $root.Values.security.tls -}}
{{- if eq (index . 1) "exporter" -}}
{{- if $tls.certManager.enabled -}}{{ include "tensortrace.componentName" (list $root "exporter-tls") }}{{- else -}}{{ default $tls.existingSecret $tls.exporterExistingSecret }}{{- end -}}
{{- else -}}
{{- if $tls.certManager.enabled -}}{{ include "tensortrace.componentName" (list $root "tls") }}{{- else -}}{{ $tls.existingSecret }}{{- end -}}
{{- end -}}
{{- end -}}

{{/* Mounts of the server certificate (when `tls`) and the tokens Secret. Call with (list $ <tls>). */}}
{{- define "tensortrace.securityVolumeMounts" -}}
{{- if index . 1 }}
- name: tls
  mountPath: /etc/tensortrace/tls
  readOnly: true
{{- end }}
{{- if (index . 0).Values.security.tokens.existingSecret }}
- name: tokens
  mountPath: /etc/tensortrace/tokens
  readOnly: true
{{- end }}
{{- end -}}

{{/* The volumes for tensortrace.securityVolumeMounts. Call with (list $ <tls> "exporter"|"query"). */}}
{{- define "tensortrace.securityVolumes" -}}
{{- $root := index . 0 -}}
{{- if index . 1 }}
- name: tls
  secret:
    # tls.crt, tls.key and ca.crt (ca.crt is read only with security.tls.clientCA)
    secretName: {{ include "tensortrace.tlsSecretName" (list $root (index . 2)) }}
{{- end }}
{{- with $root.Values.security.tokens.existingSecret }}
- name: tokens
  secret:
    secretName: {{ . }}
    items:
      - key: {{ $root.Values.security.tokens.key }}
        path: tokens
{{- end }}
{{- end -}}
