// Command promql-names prints the metric names PromQL expressions read, with Prometheus's own
// parser (the version promtool is built from). Input on stdin: a JSON array of expressions.
// Output: a JSON array with, per expression, its sorted metric names. A parse error, or a
// selector without a literal metric name, exits 1 with the expression on stderr: the chart
// tests compare these names with the ones the code exports (tests/test_monitoring.py).
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"sort"

	"github.com/prometheus/prometheus/promql/parser"
)

func names(p parser.Parser, query string) ([]string, error) {
	expr, err := p.ParseExpr(query)
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var unnamed error
	parser.Inspect(expr, func(node parser.Node, _ []parser.Node) error {
		if selector, ok := node.(*parser.VectorSelector); ok {
			if selector.Name == "" {
				unnamed = fmt.Errorf("selector %s has no metric name", selector)
			}
			seen[selector.Name] = true
		}
		return nil
	})
	if unnamed != nil {
		return nil, unnamed
	}
	found := make([]string, 0, len(seen))
	for name := range seen {
		found = append(found, name)
	}
	sort.Strings(found)
	return found, nil
}

func main() {
	var queries []string
	if err := json.NewDecoder(os.Stdin).Decode(&queries); err != nil {
		fmt.Fprintln(os.Stderr, "stdin: want a JSON array of PromQL expressions:", err)
		os.Exit(2)
	}
	p := parser.NewParser(parser.Options{})
	out := make([][]string, 0, len(queries))
	for _, query := range queries {
		found, err := names(p, query)
		if err != nil {
			fmt.Fprintf(os.Stderr, "%q: %v\n", query, err)
			os.Exit(1)
		}
		out = append(out, found)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
}
