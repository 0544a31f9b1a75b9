{{/* The image of every mesh container. */}}
{{- define "mesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "mesh.labels" -}}
app.kubernetes.io/name: mesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}

{{/* The discovery Service's in-cluster address (xDS and certificates, Istio's port). */}}
{{- define "mesh.discoveryAddress" -}}
mesh-discovery.{{ .Release.Namespace }}.svc:15012
{{- end }}

{{/* The SPIFFE ID discovery proves to proxies. */}}
{{- define "mesh.discoveryIdentity" -}}
spiffe://{{ .Values.trustDomain }}/ns/{{ .Release.Namespace }}/sa/{{ .Values.discovery.serviceAccount }}
{{- end }}

{{/* Hardened container security context. */}}
{{- define "mesh.securityContext" -}}
runAsNonRoot: true
runAsUser: 1337
runAsGroup: 1337
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end }}
