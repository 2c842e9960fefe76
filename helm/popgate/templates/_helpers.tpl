{{/* Names -------------------------------------------------------------------------------------------- */}}

{{- define "popgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "popgate.fullname" -}}
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

{{/* The admin Service's name: the full name with "-admin", kept within 63 characters. */}}
{{- define "popgate.adminName" -}}
{{- printf "%s-admin" (include "popgate.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{/* The Secret holding the admin token: the one named in values, else the chart's own, else none. */}}
{{- define "popgate.adminTokenSecret" -}}
{{- if .Values.admin.tokenSecret.name }}
{{- .Values.admin.tokenSecret.name }}
{{- else if .Values.admin.createToken }}
{{- printf "%s-admin-token" (include "popgate.fullname" . | trunc 50 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{/* The Secret keying TLS session tickets: the one named in values, else the chart's own, else none. */}}
{{- define "popgate.ticketSecret" -}}
{{- if .Values.tlsSessions.ticketSecret.name }}
{{- .Values.tlsSessions.ticketSecret.name }}
{{- else if .Values.tlsSessions.createTicketSecret }}
{{- printf "%s-tls-tickets" (include "popgate.fullname" . | trunc 50 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{- define "popgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "popgate.labels" -}}
helm.sh/chart: {{ include "popgate.chart" . }}
{{ include "popgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "popgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "popgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "popgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "popgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "popgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* "host:port" with IPv6 literals bracketed. Call with (list host port). */}}
{{- define "popgate.hostPort" -}}
{{- $host := index . 0 }}
{{- $port := index . 1 | int }}
{{- if contains ":" $host }}
{{- printf "[%s]:%d" $host $port }}
{{- else }}
{{- printf "%s:%d" $host $port }}
{{- end }}
{{- end }}

{{/* Config --------------------------------------------------------------------------------------------

The popgate config file: .Values.config plus
  - listeners built from .Values.listeners (bind = listenAddress:port; PROXY protocol when the Service has it),
  - admin.bind = listenAddress:admin.port, admin.token_file when there is a token Secret (named, or the
    chart's own random one), token_for_reads and metrics_without_token from .Values.admin, and
    admin.hosts = the admin Service's DNS names unless the config lists its own,
  - tls / tenants.<name>.tls certificate and key paths for the mounted certificate Secrets, where the config
    does not name them itself.
.Values is never modified (deepCopy), so every template that includes this renders the same text. */}}
{{- define "popgate.configYaml" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- if hasKey $cfg "listeners" }}
{{- fail "config.listeners is built from .Values.listeners (each: name, port, servicePort, tls, ...); remove it from config" }}
{{- end }}
{{- $pp := .Values.service.proxyProtocol }}
{{- $listeners := list }}
{{- $seen := dict }}
{{- range .Values.listeners }}
{{- if not (and .name .port) }}
{{- fail "each entry of .Values.listeners needs a name and a port" }}
{{- end }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?$" .name) }}
{{- fail (printf "listener name %q: it also names a container port, so use at most 15 lowercase letters, digits and '-'" .name) }}
{{- end }}
{{- if eq .name "admin" }}
{{- fail "listener name \"admin\" is taken by the admin HTTP port" }}
{{- end }}
{{- if hasKey $seen .name }}
{{- fail (printf "listener name %q appears twice in .Values.listeners" .name) }}
{{- end }}
{{- $_ := set $seen .name true }}
{{- $l := omit (deepCopy .) "port" "servicePort" "nodePort" }}
{{- $_ := set $l "bind" (include "popgate.hostPort" (list $.Values.listenAddress .port)) }}
{{- if and $pp.enabled (not (hasKey $l "proxy_protocol")) }}
{{- $_ := set $l "proxy_protocol" (dict "trusted_networks" $pp.trustedNetworks) }}
{{- end }}
{{- $listeners = append $listeners $l }}
{{- end }}
{{- $_ := set $cfg "listeners" $listeners }}
{{- $admin := deepCopy (get $cfg "admin" | default dict) }}
{{- $_ := set $admin "bind" (include "popgate.hostPort" (list .Values.listenAddress .Values.admin.port)) }}
{{- if .Values.admin.tokenSecret.name }}
{{- if or (hasKey $admin "token") (hasKey $admin "token_file") }}
{{- fail "admin.tokenSecret is set: remove config.admin.token / config.admin.token_file (the chart sets token_file)" }}
{{- end }}
{{- end }}
{{- if and (include "popgate.adminTokenSecret" .) (not (hasKey $admin "token")) (not (hasKey $admin "token_file")) }}
{{- $_ := set $admin "token_file" "/etc/popgate/admin/token" }}
{{- end }}
{{- if not (hasKey $admin "token_for_reads") }}
{{- $_ := set $admin "token_for_reads" .Values.admin.tokenForReads }}
{{- end }}
{{- if not (hasKey $admin "metrics_without_token") }}
{{- $_ := set $admin "metrics_without_token" .Values.admin.metricsWithoutToken }}
{{- end }}
{{- /* The admin server answers only Host names it knows (DNS-rebinding defence): the admin Service's names,
       unless the config lists its own. Probes and Prometheus use the pod IP, which always passes. */}}
{{- if not (hasKey $admin "hosts") }}
{{- $svc := include "popgate.adminName" . }}
{{- $ns := .Release.Namespace }}
{{- $_ := set $admin "hosts" (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns)) }}
{{- end }}
{{- $_ := set $cfg "admin" $admin }}
{{- /* Every replica keys its session tickets with the same Secret, so a client resumes on any of them. */}}
{{- if include "popgate.ticketSecret" . }}
{{- $sessions := deepCopy (get $cfg "tls_sessions" | default dict) }}
{{- if not (hasKey $sessions "ticket_secret_file") }}
{{- $_ := set $sessions "ticket_secret_file" "/etc/popgate/tls-tickets/secret" }}
{{- end }}
{{- $_ := set $cfg "tls_sessions" $sessions }}
{{- end }}
{{- with .Values.cluster }}
{{- if .servers }}
{{- if hasKey $cfg "cluster" }}
{{- fail "cluster.servers is set: remove config.cluster (the chart writes it from .Values.cluster)" }}
{{- end }}
{{- if not .keySecret.name }}
{{- fail "cluster.keySecret.name is required with cluster.servers (a Secret holding the key that names every key)" }}
{{- end }}
{{- $c := dict "mode" .mode "servers" .servers "key_secret_file" "/etc/popgate/cluster/key" "key_prefix" .keyPrefix "timeout" .timeout "lease_ttl" .leaseTtl }}
{{- with .sentinelService }}{{- $_ := set $c "sentinel_service" . }}{{- end }}
{{- with .username }}{{- $_ := set $c "username" . }}{{- end }}
{{- if .passwordSecret.name }}{{- $_ := set $c "password_file" "/etc/popgate/cluster/password" }}{{- end }}
{{- if .tls.enabled }}
{{- $t := dict }}
{{- if .tls.caSecret.name }}{{- $_ := set $t "ca" "/etc/popgate/cluster/ca.crt" }}{{- end }}
{{- with .tls.serverName }}{{- $_ := set $t "server_name" . }}{{- end }}
{{- $_ := set $c "tls" $t }}
{{- end }}
{{- with .whenUnavailable }}{{- $_ := set $c "when_unavailable" . }}{{- end }}
{{- $_ := set $cfg "cluster" $c }}
{{- end }}
{{- end }}
{{- if and .Values.certificates.default.secretName (not (hasKey $cfg "tls")) }}
{{- $_ := set $cfg "tls" (dict "certificate" "/etc/popgate/tls/tls.crt" "key" "/etc/popgate/tls/tls.key") }}
{{- end }}
{{- $tenants := get $cfg "tenants" | default dict }}
{{- range $name, $cert := .Values.certificates.tenants }}
{{- if not (hasKey $tenants $name) }}
{{- fail (printf "certificates.tenants.%s: config.tenants has no tenant %q" $name $name) }}
{{- end }}
{{- $tenant := get $tenants $name }}
{{- $tls := get $tenant "tls" | default dict }}
{{- if not (hasKey $tls "certificate") }}
{{- $_ := set $tls "certificate" (printf "/etc/popgate/tls/%s/tls.crt" $name) }}
{{- end }}
{{- if not (hasKey $tls "key") }}
{{- $_ := set $tls "key" (printf "/etc/popgate/tls/%s/tls.key" $name) }}
{{- end }}
{{- $_ := set $tenant "tls" $tls }}
{{- end }}
{{- /* Drain budget: timeouts.shutdown_grace (when written as plain seconds, "Ns" or "Nm") must fit the pod's
       grace period. */}}
{{- with get (get $cfg "timeouts" | default dict) "shutdown_grace" }}
{{- $grace := toString . }}
{{- $secs := -1 }}
{{- if regexMatch "^[0-9]+s?$" $grace }}
{{- $secs = trimSuffix "s" $grace | int }}
{{- else if regexMatch "^[0-9]+m$" $grace }}
{{- $secs = mul (trimSuffix "m" $grace | int) 60 }}
{{- end }}
{{- if and (ge $secs 0) (le (int $.Values.shutdown.terminationGracePeriodSeconds) (add $secs (int $.Values.shutdown.preStopSleepSeconds))) }}
{{- fail (printf "shutdown.terminationGracePeriodSeconds (%d) must exceed shutdown.preStopSleepSeconds (%d) + config.timeouts.shutdown_grace (%ds)" (int $.Values.shutdown.terminationGracePeriodSeconds) (int $.Values.shutdown.preStopSleepSeconds) $secs) }}
{{- end }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* Service annotations that switch on PROXY protocol (v2 where the provider offers a choice). */}}
{{- define "popgate.proxyProtocolAnnotations" -}}
{{- $pp := .Values.service.proxyProtocol }}
{{- if and $pp.enabled $pp.provider }}
{{- $known := dict
  "aws" (dict "service.beta.kubernetes.io/aws-load-balancer-proxy-protocol" "*")
  "digitalocean" (dict "service.beta.kubernetes.io/do-loadbalancer-enable-proxy-protocol" "true")
  "hetzner" (dict "load-balancer.hetzner.cloud/uses-proxyprotocol" "true")
  "linode" (dict "service.beta.kubernetes.io/linode-loadbalancer-default-proxy-protocol" "v2")
  "scaleway" (dict "service.beta.kubernetes.io/scw-loadbalancer-proxy-protocol-v2" "*")
}}
{{- if not (hasKey $known $pp.provider) }}
{{- fail (printf "service.proxyProtocol.provider %q: expected one of aws, digitalocean, hetzner, linode, scaleway, or \"\" (annotate the Service yourself)" $pp.provider) }}
{{- end }}
{{- toYaml (get $known $pp.provider) }}
{{- end }}
{{- end }}
