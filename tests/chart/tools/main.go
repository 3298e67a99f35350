// charttools: the two pieces of real upstream code the chart tests need beside helm, in one small
// binary (built by `make chart-tools` from the Go module proxy, like helm):
//
//	charttools promql < exprs.json      the Prometheus PromQL parser (github.com/prometheus/prometheus/
//	                                    promql/parser): for each expression, the metric names it selects,
//	                                    or the parse error. In: a JSON array of strings; out: a JSON array
//	                                    of {"metrics": [...], "error": "..."}.
//	charttools kustomize DIR            kustomize's build engine (sigs.k8s.io/kustomize/api/krusty, what
//	                                    `kubectl kustomize` runs): the built manifests as YAML.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

type parsed struct {
	Metrics []string `json:"metrics"`
	Error   string   `json:"error,omitempty"`
}

func promql() error {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		return err
	}
	var exprs []string
	if err := json.Unmarshal(data, &exprs); err != nil {
		return fmt.Errorf("stdin: a JSON array of strings: %w", err)
	}
	p := parser.NewParser(parser.Options{})
	out := make([]parsed, len(exprs))
	for i, text := range exprs {
		out[i].Metrics = []string{}
		expr, err := p.ParseExpr(text)
		if err != nil {
			out[i].Error = err.Error()
			continue
		}
		seen := map[string]bool{}
		for _, matchers := range parser.ExtractSelectors(expr) {
			name := ""
			for _, m := range matchers {
				if m.Name == labels.MetricName && m.Type == labels.MatchEqual {
					name = m.Value
				}
			}
			if name == "" {
				out[i].Error = "a selector without a metric name (matches every metric)"
				continue
			}
			if !seen[name] {
				seen[name] = true
				out[i].Metrics = append(out[i].Metrics, name)
			}
		}
		sort.Strings(out[i].Metrics)
	}
	return json.NewEncoder(os.Stdout).Encode(out)
}

func kustomize(dir string) error {
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	m, err := k.Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		return err
	}
	yml, err := m.AsYaml()
	if err != nil {
		return err
	}
	_, err = os.Stdout.Write(yml)
	return err
}

func main() {
	var err error
	switch {
	case len(os.Args) == 2 && os.Args[1] == "promql":
		err = promql()
	case len(os.Args) == 3 && os.Args[1] == "kustomize":
		err = kustomize(os.Args[2])
	default:
		err = fmt.Errorf("usage: charttools promql < exprs.json | charttools kustomize DIR")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "charttools:", err)
		os.Exit(1)
	}
}
