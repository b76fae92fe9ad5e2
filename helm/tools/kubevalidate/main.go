// kubevalidate checks rendered Helm output against Kubernetes' own API types.
//
// Every document is decoded strictly (unknown fields and wrong types fail) into the
// k8s.io/api type for its apiVersion and kind; names and labels are checked with
// apimachinery's validation. The CRDs the chart can render (ServiceMonitor,
// PrometheusRule, KEDA ScaledObject, cert-manager Certificate and Issuer) are not in
// k8s.io/api and are checked against local structs of the fields the chart uses.
//
// With -extract DIR it also writes what the lock-step test needs: the leasehold
// container's config file, arguments and environment, the preStop command, and the
// commands of the helm test pod.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"text/template"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"
)

// SecretKeySelector: a key of a Secret in the object's namespace (prometheus-operator).
type SecretKeySelector struct {
	Name string `json:"name"`
	Key  string `json:"key"`
}

// ServiceMonitor: the fields of monitoring.coreos.com/v1 the chart renders.
type ServiceMonitor struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		Selector  metav1.LabelSelector `json:"selector"`
		Endpoints []struct {
			Port      string `json:"port"`
			Path      string `json:"path"`
			Interval  string `json:"interval"`
			Scheme    string `json:"scheme,omitempty"`
			TLSConfig *struct {
				CA struct {
					Secret    *SecretKeySelector `json:"secret,omitempty"`
					ConfigMap *SecretKeySelector `json:"configMap,omitempty"`
				} `json:"ca"`
				ServerName         string `json:"serverName,omitempty"`
				InsecureSkipVerify *bool  `json:"insecureSkipVerify,omitempty"`
			} `json:"tlsConfig,omitempty"`
			BearerTokenSecret *SecretKeySelector `json:"bearerTokenSecret,omitempty"`
		} `json:"endpoints"`
	} `json:"spec"`
}

// IssuerRef: a cert-manager issuer reference.
type IssuerRef struct {
	Name  string `json:"name"`
	Kind  string `json:"kind,omitempty"`
	Group string `json:"group,omitempty"`
}

// Certificate: the fields of cert-manager.io/v1 the chart renders.
type Certificate struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		SecretName  string   `json:"secretName"`
		CommonName  string   `json:"commonName,omitempty"`
		DNSNames    []string `json:"dnsNames,omitempty"`
		IPAddresses []string `json:"ipAddresses,omitempty"`
		Duration    string   `json:"duration,omitempty"`
		RenewBefore string   `json:"renewBefore,omitempty"`
		IsCA        bool     `json:"isCA,omitempty"`
		Usages      []string `json:"usages,omitempty"`
		PrivateKey  *struct {
			Algorithm      string `json:"algorithm,omitempty"`
			Size           int    `json:"size,omitempty"`
			Encoding       string `json:"encoding,omitempty"`
			RotationPolicy string `json:"rotationPolicy,omitempty"`
		} `json:"privateKey,omitempty"`
		IssuerRef IssuerRef `json:"issuerRef"`
	} `json:"spec"`
}

// Issuer: the fields of cert-manager.io/v1 the chart renders (self-signed and CA issuers).
type Issuer struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		SelfSigned *struct{} `json:"selfSigned,omitempty"`
		CA         *struct {
			SecretName string `json:"secretName"`
		} `json:"ca,omitempty"`
	} `json:"spec"`
}

// Enumerations of cert-manager and prometheus-operator fields (their CRDs' schemas).
var (
	certUsages = map[string]bool{"signing": true, "digital signature": true, "content commitment": true,
		"key encipherment": true, "key agreement": true, "data encipherment": true, "cert sign": true,
		"crl sign": true, "encipher only": true, "decipher only": true, "any": true, "server auth": true,
		"client auth": true, "code signing": true, "email protection": true, "s/mime": true,
		"ipsec end system": true, "ipsec tunnel": true, "ipsec user": true, "timestamping": true,
		"ocsp signing": true, "microsoft sgc": true, "netscape sgc": true}
	keyAlgorithms   = map[string]bool{"RSA": true, "ECDSA": true, "Ed25519": true}
	keyEncodings    = map[string]bool{"PKCS1": true, "PKCS8": true}
	rotationPolicys = map[string]bool{"Never": true, "Always": true}
	goDuration      = regexp.MustCompile(`^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$`)
)

// checkCertificate: what cert-manager's webhook would refuse, for the fields the chart sets.
func checkCertificate(c *Certificate) []string {
	var errs []string
	s := c.Spec
	if s.SecretName == "" {
		errs = append(errs, "spec.secretName is required")
	}
	for _, e := range validation.IsDNS1123Subdomain(s.SecretName) {
		errs = append(errs, fmt.Sprintf("spec.secretName %q: %s", s.SecretName, e))
	}
	if s.CommonName == "" && len(s.DNSNames) == 0 && len(s.IPAddresses) == 0 {
		errs = append(errs, "at least one of commonName, dnsNames, ipAddresses is required")
	}
	if len(s.CommonName) > 64 {
		errs = append(errs, fmt.Sprintf("spec.commonName %q: longer than 64 bytes", s.CommonName))
	}
	for _, d := range s.DNSNames {
		if d != "localhost" {
			for _, e := range validation.IsDNS1123Subdomain(d) {
				errs = append(errs, fmt.Sprintf("spec.dnsNames %q: %s", d, e))
			}
		}
	}
	for _, ip := range s.IPAddresses {
		for _, e := range validation.IsValidIP(nil, ip) {
			errs = append(errs, fmt.Sprintf("spec.ipAddresses %q: %s", ip, e.Detail))
		}
	}
	for name, d := range map[string]string{"duration": s.Duration, "renewBefore": s.RenewBefore} {
		if d != "" && !goDuration.MatchString(d) {
			errs = append(errs, fmt.Sprintf("spec.%s %q: not a duration", name, d))
		}
	}
	for _, u := range s.Usages {
		if !certUsages[u] {
			errs = append(errs, fmt.Sprintf("spec.usages %q: unknown usage", u))
		}
	}
	if k := s.PrivateKey; k != nil {
		if k.Algorithm != "" && !keyAlgorithms[k.Algorithm] {
			errs = append(errs, fmt.Sprintf("spec.privateKey.algorithm %q: not RSA, ECDSA or Ed25519", k.Algorithm))
		}
		if k.Algorithm == "ECDSA" && k.Size != 0 && k.Size != 256 && k.Size != 384 && k.Size != 521 {
			errs = append(errs, fmt.Sprintf("spec.privateKey.size %d: ECDSA takes 256, 384 or 521", k.Size))
		}
		if k.Encoding != "" && !keyEncodings[k.Encoding] {
			errs = append(errs, fmt.Sprintf("spec.privateKey.encoding %q: not PKCS1 or PKCS8", k.Encoding))
		}
		if k.RotationPolicy != "" && !rotationPolicys[k.RotationPolicy] {
			errs = append(errs, fmt.Sprintf("spec.privateKey.rotationPolicy %q: not Never or Always", k.RotationPolicy))
		}
	}
	if s.IssuerRef.Name == "" {
		errs = append(errs, "spec.issuerRef.name is required")
	}
	return errs
}

func checkIssuer(i *Issuer) []string {
	n := 0
	if i.Spec.SelfSigned != nil {
		n++
	}
	if i.Spec.CA != nil {
		n++
		if i.Spec.CA.SecretName == "" {
			return []string{"spec.ca.secretName is required"}
		}
	}
	if n != 1 {
		return []string{"exactly one of spec.selfSigned and spec.ca is required"}
	}
	return nil
}

func checkServiceMonitor(m *ServiceMonitor) []string {
	var errs []string
	for i, e := range m.Spec.Endpoints {
		if e.Scheme != "" && e.Scheme != "http" && e.Scheme != "https" {
			errs = append(errs, fmt.Sprintf("spec.endpoints[%d].scheme %q: not http or https", i, e.Scheme))
		}
		if t := e.TLSConfig; t != nil {
			if (t.CA.Secret != nil) == (t.CA.ConfigMap != nil) {
				errs = append(errs, fmt.Sprintf("spec.endpoints[%d].tlsConfig.ca: exactly one of secret and configMap", i))
			}
			if t.InsecureSkipVerify != nil && *t.InsecureSkipVerify {
				errs = append(errs, fmt.Sprintf("spec.endpoints[%d].tlsConfig.insecureSkipVerify: the chart must verify certificates", i))
			}
		}
		refs := []*SecretKeySelector{e.BearerTokenSecret}
		if e.TLSConfig != nil {
			refs = append(refs, e.TLSConfig.CA.Secret, e.TLSConfig.CA.ConfigMap)
		}
		for _, r := range refs {
			if r != nil && (r.Name == "" || r.Key == "") {
				errs = append(errs, fmt.Sprintf("spec.endpoints[%d]: a Secret or ConfigMap reference needs name and key", i))
			}
		}
	}
	return errs
}

// PrometheusRule: the fields of monitoring.coreos.com/v1 the chart renders, and those of
// a rule (metrics.prometheusRule.additionalRules may add any rule).
type PrometheusRule struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		Groups []struct {
			Name     string `json:"name"`
			Interval string `json:"interval,omitempty"`
			Rules    []struct {
				Alert         string             `json:"alert,omitempty"`
				Record        string             `json:"record,omitempty"`
				Expr          intstr.IntOrString `json:"expr"`
				For           *string            `json:"for,omitempty"`
				KeepFiringFor *string            `json:"keep_firing_for,omitempty"`
				Labels        map[string]string  `json:"labels,omitempty"`
				Annotations   map[string]string  `json:"annotations,omitempty"`
			} `json:"rules"`
		} `json:"groups"`
	} `json:"spec"`
}

var (
	// prometheus-operator's Duration pattern.
	promDuration   = regexp.MustCompile(`^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$`)
	promMetricName = regexp.MustCompile(`^[a-zA-Z_:][a-zA-Z0-9_:]*$`)
	promLabelName  = regexp.MustCompile(`^[a-zA-Z_][a-zA-Z0-9_]*$`)
	// Prometheus' template functions, for parsing annotations (not running them).
	promTemplateFuncs = template.FuncMap{}
)

func init() {
	for _, f := range []string{"query", "first", "label", "value", "strvalue", "args", "reReplaceAll",
		"safeHtml", "match", "title", "toUpper", "toLower", "graphLink", "tableLink", "sortByLabel",
		"humanize", "humanize1024", "humanizeDuration", "humanizePercentage", "humanizeTimestamp",
		"toTime", "toDuration", "pathPrefix", "externalURL", "parseDuration", "stripPort",
		"stripDomain", "now"} {
		promTemplateFuncs[f] = func(...interface{}) interface{} { return nil }
	}
}

// checkPrometheusRule: what the operator's CRD schema and Prometheus' rule loader would
// refuse, short of parsing PromQL. Annotations must parse as Prometheus templates (a
// {{ $labels.x }} that Helm ate or mangled fails here).
func checkPrometheusRule(r *PrometheusRule) []string {
	var errs []string
	if len(r.Spec.Groups) == 0 {
		errs = append(errs, "spec.groups: at least one group")
	}
	names := map[string]bool{}
	for gi, g := range r.Spec.Groups {
		if g.Name == "" || names[g.Name] {
			errs = append(errs, fmt.Sprintf("spec.groups[%d].name %q: empty or repeated", gi, g.Name))
		}
		names[g.Name] = true
		if g.Interval != "" && !promDuration.MatchString(g.Interval) {
			errs = append(errs, fmt.Sprintf("spec.groups[%d].interval %q: not a duration", gi, g.Interval))
		}
		for ri, rule := range g.Rules {
			at := fmt.Sprintf("spec.groups[%d].rules[%d]", gi, ri)
			if (rule.Alert == "") == (rule.Record == "") {
				errs = append(errs, at+": exactly one of alert and record")
			}
			if rule.Record != "" && !promMetricName.MatchString(rule.Record) {
				errs = append(errs, fmt.Sprintf("%s.record %q: not a metric name", at, rule.Record))
			}
			if rule.Record != "" && (rule.For != nil || rule.KeepFiringFor != nil || rule.Annotations != nil) {
				errs = append(errs, at+": a record rule has no for, keep_firing_for or annotations")
			}
			if rule.Expr.Type == intstr.String && strings.TrimSpace(rule.Expr.StrVal) == "" {
				errs = append(errs, at+".expr: empty")
			}
			for name, d := range map[string]*string{"for": rule.For, "keep_firing_for": rule.KeepFiringFor} {
				if d != nil && !promDuration.MatchString(*d) {
					errs = append(errs, fmt.Sprintf("%s.%s %q: not a duration", at, name, *d))
				}
			}
			for k := range rule.Labels {
				if !promLabelName.MatchString(k) {
					errs = append(errs, fmt.Sprintf("%s.labels %q: not a label name", at, k))
				}
			}
			for k, v := range rule.Annotations {
				if !promLabelName.MatchString(k) {
					errs = append(errs, fmt.Sprintf("%s.annotations %q: not a label name", at, k))
				}
				prefix := "{{$labels := .Labels}}{{$externalLabels := .ExternalLabels}}{{$externalURL := .ExternalURL}}{{$value := .Value}}"
				if _, err := template.New(k).Funcs(promTemplateFuncs).Parse(prefix + v); err != nil {
					errs = append(errs, fmt.Sprintf("%s.annotations.%s: not a Prometheus template: %v", at, k, err))
				}
			}
		}
	}
	return errs
}

// ScaledObject: the fields of keda.sh/v1alpha1 the chart renders.
type ScaledObject struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		ScaleTargetRef struct {
			Name string `json:"name"`
		} `json:"scaleTargetRef"`
		MinReplicaCount *int32 `json:"minReplicaCount"`
		MaxReplicaCount *int32 `json:"maxReplicaCount"`
		PollingInterval *int32 `json:"pollingInterval"`
		CooldownPeriod  *int32 `json:"cooldownPeriod"`
		Triggers        []struct {
			Type     string            `json:"type"`
			Metadata map[string]string `json:"metadata"`
		} `json:"triggers"`
	} `json:"spec"`
}

func newObject(apiVersion, kind string) (interface{}, bool) {
	switch apiVersion + "/" + kind {
	case "v1/ConfigMap":
		return &corev1.ConfigMap{}, true
	case "v1/Service":
		return &corev1.Service{}, true
	case "v1/Secret":
		return &corev1.Secret{}, true
	case "v1/ServiceAccount":
		return &corev1.ServiceAccount{}, true
	case "v1/Pod":
		return &corev1.Pod{}, true
	case "apps/v1/Deployment":
		return &appsv1.Deployment{}, true
	case "apps/v1/StatefulSet":
		return &appsv1.StatefulSet{}, true
	case "policy/v1/PodDisruptionBudget":
		return &policyv1.PodDisruptionBudget{}, true
	case "networking.k8s.io/v1/NetworkPolicy":
		return &networkingv1.NetworkPolicy{}, true
	case "autoscaling/v2/HorizontalPodAutoscaler":
		return &autoscalingv2.HorizontalPodAutoscaler{}, true
	case "monitoring.coreos.com/v1/ServiceMonitor":
		return &ServiceMonitor{}, true
	case "monitoring.coreos.com/v1/PrometheusRule":
		return &PrometheusRule{}, true
	case "keda.sh/v1alpha1/ScaledObject":
		return &ScaledObject{}, true
	case "cert-manager.io/v1/Certificate":
		return &Certificate{}, true
	case "cert-manager.io/v1/Issuer":
		return &Issuer{}, true
	}
	return nil, false
}

func checkMeta(m metav1.ObjectMeta) []string {
	var errs []string
	for _, e := range validation.IsDNS1123Subdomain(m.Name) {
		errs = append(errs, fmt.Sprintf("metadata.name %q: %s", m.Name, e))
	}
	for k, v := range m.Labels {
		for _, e := range validation.IsQualifiedName(k) {
			errs = append(errs, fmt.Sprintf("label key %q: %s", k, e))
		}
		for _, e := range validation.IsValidLabelValue(v) {
			errs = append(errs, fmt.Sprintf("label %q value %q: %s", k, v, e))
		}
	}
	return errs
}

var separator = regexp.MustCompile(`(?m)^---\s*$`)

func main() {
	extract := flag.String("extract", "", "directory to write the leasehold container's config, args and env to")
	flag.Parse()
	input, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var failures []string
	var configMaps []*corev1.ConfigMap
	var deployments []*appsv1.Deployment
	var pods []*corev1.Pod
	count := 0
	for _, doc := range separator.Split(string(input), -1) {
		if strings.TrimSpace(stripComments(doc)) == "" {
			continue
		}
		js, err := yaml.YAMLToJSON([]byte(doc))
		if err != nil {
			failures = append(failures, fmt.Sprintf("not YAML: %v", err))
			continue
		}
		var tm metav1.TypeMeta
		if err := json.Unmarshal(js, &tm); err != nil || tm.Kind == "" {
			failures = append(failures, fmt.Sprintf("document without apiVersion/kind: %.80s", doc))
			continue
		}
		obj, ok := newObject(tm.APIVersion, tm.Kind)
		if !ok {
			failures = append(failures, fmt.Sprintf("%s %s: not a known API type", tm.APIVersion, tm.Kind))
			continue
		}
		dec := json.NewDecoder(bytes.NewReader(js))
		dec.DisallowUnknownFields()
		if err := dec.Decode(obj); err != nil {
			failures = append(failures, fmt.Sprintf("%s %s: %v", tm.APIVersion, tm.Kind, err))
			continue
		}
		count++
		var meta metav1.ObjectMeta
		var errs []string
		switch o := obj.(type) {
		case *corev1.ConfigMap:
			meta = o.ObjectMeta
			configMaps = append(configMaps, o)
		case *appsv1.Deployment:
			meta = o.ObjectMeta
			deployments = append(deployments, o)
		case *corev1.Pod:
			meta = o.ObjectMeta
			pods = append(pods, o)
		case *corev1.Service:
			meta = o.ObjectMeta
		case *corev1.ServiceAccount:
			meta = o.ObjectMeta
		case *corev1.Secret:
			meta = o.ObjectMeta
			if o.StringData != nil {
				errs = append(errs, "stringData: the chart renders data")
			}
		case *appsv1.StatefulSet:
			meta = o.ObjectMeta
		case *policyv1.PodDisruptionBudget:
			meta = o.ObjectMeta
		case *networkingv1.NetworkPolicy:
			meta = o.ObjectMeta
		case *autoscalingv2.HorizontalPodAutoscaler:
			meta = o.ObjectMeta
		case *ServiceMonitor:
			meta = o.ObjectMeta
			errs = checkServiceMonitor(o)
		case *PrometheusRule:
			meta = o.ObjectMeta
			errs = checkPrometheusRule(o)
		case *ScaledObject:
			meta = o.ObjectMeta
		case *Certificate:
			meta = o.ObjectMeta
			errs = checkCertificate(o)
		case *Issuer:
			meta = o.ObjectMeta
			errs = checkIssuer(o)
		}
		for _, e := range append(checkMeta(meta), errs...) {
			failures = append(failures, fmt.Sprintf("%s %s: %s", tm.Kind, meta.Name, e))
		}
	}
	if *extract != "" && len(failures) == 0 {
		if err := writeExtract(*extract, configMaps, deployments, pods); err != nil {
			failures = append(failures, err.Error())
		}
	}
	for _, f := range failures {
		fmt.Fprintln(os.Stderr, "invalid:", f)
	}
	if len(failures) > 0 {
		os.Exit(1)
	}
	fmt.Printf("%d manifests valid\n", count)
}

func stripComments(doc string) string {
	var b strings.Builder
	for _, line := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(line), "#") {
			b.WriteString(line)
			b.WriteString("\n")
		}
	}
	return b.String()
}

// Values the kubelet would fill in, for running the container's command locally.
var fieldValues = map[string]string{"metadata.name": "leasehold-0", "status.podIP": "10.0.0.1"}

var varRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

func writeExtract(dir string, cms []*corev1.ConfigMap, deps []*appsv1.Deployment, pods []*corev1.Pod) error {
	if len(deps) != 1 {
		return fmt.Errorf("expected one Deployment, found %d", len(deps))
	}
	var c *corev1.Container
	for i := range deps[0].Spec.Template.Spec.Containers {
		if deps[0].Spec.Template.Spec.Containers[i].Name == "leasehold" {
			c = &deps[0].Spec.Template.Spec.Containers[i]
		}
	}
	if c == nil {
		return fmt.Errorf("no container named leasehold")
	}
	var config string
	for _, cm := range cms {
		if s, ok := cm.Data["config.toml"]; ok {
			config = s
		}
	}
	if config == "" {
		return fmt.Errorf("no ConfigMap with config.toml")
	}
	env := map[string]string{}
	var lines []string
	for _, e := range c.Env {
		v := e.Value
		if e.ValueFrom != nil {
			switch {
			case e.ValueFrom.FieldRef != nil:
				v = fieldValues[e.ValueFrom.FieldRef.FieldPath]
			case e.ValueFrom.SecretKeyRef != nil:
				v = "secret-" + e.ValueFrom.SecretKeyRef.Key
			}
		}
		v = varRef.ReplaceAllStringFunc(v, func(m string) string { return env[varRef.FindStringSubmatch(m)[1]] })
		env[e.Name] = v
		lines = append(lines, e.Name+"="+v)
	}
	files := map[string]string{
		"config.toml": config,
		"args.txt":    strings.Join(append(append([]string{}, c.Command...), c.Args...), "\n") + "\n",
		"env.txt":     strings.Join(lines, "\n") + "\n",
	}
	if c.Lifecycle != nil && c.Lifecycle.PreStop != nil && c.Lifecycle.PreStop.Exec != nil {
		files["prestop.txt"] = strings.Join(c.Lifecycle.PreStop.Exec.Command, "\n") + "\n"
	}
	var hooks []string
	for _, p := range pods {
		for _, pc := range p.Spec.Containers {
			hooks = append(hooks, strings.Join(pc.Args, "\t"))
		}
	}
	files["hooks.txt"] = strings.Join(hooks, "\n") + "\n"
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			return err
		}
	}
	return nil
}
