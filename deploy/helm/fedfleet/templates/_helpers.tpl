{{/* Names and labels. */}}
{{- define "fedfleet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fedfleet.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "fedfleet.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "fedfleet.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "fedfleet.passwd" -}}
{{- if eq .Values.mqtt.credentialStore "passwd" -}}true{{- end -}}
{{- end -}}

{{/*
The init container that copies the fleet Secret's files into /fleet, owner-only, for the
pod's user: Secret volumes cannot be owned by a non-root user, and the coordinator refuses
a task key or broker password that group or others can read. With the password-file store
the broker's password file is seeded once (enrolled devices live in it) and the ACL is
rewritten from the Secret at every start.
*/}}
{{- define "fedfleet.fleetFiles" -}}
- name: fleet-files
  image: {{ include "fedfleet.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - sh
    - -ec
    - |
      umask 077
      mkdir -p /fleet/tls /fleet/keys /fleet/mqtt
      install -m 0644 /secret/ca.pem /fleet/tls/ca.pem
      install -m 0644 /secret/server.pem /fleet/tls/server.pem
      install -m 0600 /secret/server.key /fleet/tls/server.key
      install -m 0600 /secret/coordinator.secret /fleet/mqtt/coordinator.secret
      install -m 0600 /secret/task-token.key /fleet/keys/task-token.key
      {{- if include "fedfleet.passwd" . }}
      [ -f /fleet/mqtt/passwd ] || install -m 0600 /secret/passwd /fleet/mqtt/passwd
      install -m 0644 /secret/acl /fleet/mqtt/acl
      {{- end }}
  volumeMounts:
    - {name: fleet-secret, mountPath: /secret, readOnly: true}
    - {name: fleet, mountPath: /fleet}
    {{- if include "fedfleet.passwd" . }}
    - {name: broker, mountPath: /fleet/mqtt}
    {{- end }}
{{- end -}}

{{/* Kafka over SASL_SSL: the user's password (0600) and the CA, copied from the Kafka
Secret by an init container (the services refuse a password file others can read).
Call with (dict "root" . "user" "coordinator"|"aggregator"). */}}
{{- define "fedfleet.kafkaFiles" -}}
{{- if .root.Values.kafka.sasl.enabled -}}
- name: kafka-files
  image: {{ include "fedfleet.image" .root }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  command:
    - sh
    - -ec
    - |
      umask 077
      install -m 0600 /kafka-secret/{{ .user }}.secret /kafka/{{ .user }}.secret
      install -m 0644 /kafka-secret/ca.pem /kafka/ca.pem
  volumeMounts:
    - {name: kafka-secret, mountPath: /kafka-secret, readOnly: true}
    - {name: kafka, mountPath: /kafka}
{{- end }}
{{- end -}}

{{- define "fedfleet.kafkaEnv" -}}
{{- if .root.Values.kafka.sasl.enabled -}}
- {name: {{ .prefix }}KAFKA_USERNAME, value: {{ .user | quote }}}
- {name: {{ .prefix }}KAFKA_PASSWORD_FILE, value: /kafka/{{ .user }}.secret}
- {name: {{ .prefix }}KAFKA_CAFILE, value: /kafka/ca.pem}
- {name: {{ .prefix }}KAFKA_SASL_MECHANISM, value: {{ .root.Values.kafka.sasl.mechanism | quote }}}
{{- end }}
{{- end -}}

{{- define "fedfleet.kafkaVolumes" -}}
{{- if .Values.kafka.sasl.enabled -}}
- name: kafka-secret
  secret: {secretName: {{ .Values.kafka.sasl.secretName }}, defaultMode: 0440}
- name: kafka
  emptyDir: {medium: Memory, sizeLimit: 1Mi}
{{- end }}
{{- end -}}

{{- define "fedfleet.claim" -}}
{{- $s := .storage -}}
{{- if not $s.existingClaim }}
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {{ .name }}
  labels:
    {{- include "fedfleet.labels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
  annotations:
    helm.sh/resource-policy: keep  # the model store / checkpoints / enrolments outlive the release
spec:
  accessModes: [{{ .accessMode | default $s.accessMode }}]
  {{- with $s.storageClass }}
  storageClassName: {{ . }}
  {{- end }}
  resources:
    requests:
      storage: {{ $s.size }}
{{- end }}
{{- end -}}
