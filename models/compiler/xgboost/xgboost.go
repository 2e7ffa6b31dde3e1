// Package xgboost reads tree ensembles saved by XGBoost as JSON
// (Booster.save_model("model.json")) and evaluates them natively.
//
// Supported: the gbtree booster with numeric splits, objectives
// binary:logistic, reg:logistic, reg:squarederror, binary:logitraw and
// multi:softprob, base_score, and missing values (NaN) following each
// split's default direction. Everything else (dart, gblinear, categorical
// splits, multi-target trees, other objectives) is refused with an error
// naming it.
//
// The native evaluator reproduces XGBoost's own arithmetic: the margin starts
// at the base margin and each tree's leaf is added in float32, in tree order;
// only the final transform (sigmoid, softmax) is computed in float64 and
// rounded. It is the reference the compiled modules are tested and
// benchmarked against.
package xgboost

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"strings"
)

// Limits on what Parse accepts, checked before the work they bound.
const (
	// MaxFileSize is the largest model file read.
	MaxFileSize = 64 << 20
	// MaxFeatures is the most input features.
	MaxFeatures = 1 << 16
	// MaxClasses is the most output groups of multi:softprob.
	MaxClasses = 1024
	// MaxNodes is the most nodes over all trees.
	MaxNodes = 1 << 22
	// MaxDepth is the deepest tree: the compiler nests one block per level.
	MaxDepth = 256
)

// Errors that callers may branch on.
var (
	// ErrInvalid: the file is not a well-formed XGBoost JSON model.
	ErrInvalid = errors.New("invalid xgboost model")
	// ErrUnsupported: a well-formed model uses a feature this package
	// does not support.
	ErrUnsupported = errors.New("unsupported xgboost model")
)

// Objectives this package supports.
const (
	BinaryLogistic  = "binary:logistic"
	RegLogistic     = "reg:logistic"
	BinaryLogitRaw  = "binary:logitraw"
	RegSquaredError = "reg:squarederror"
	MultiSoftprob   = "multi:softprob"
)

// Transform is what turns a row's margins into its outputs.
type Transform int

// Transforms.
const (
	// Identity outputs the margin.
	Identity Transform = iota
	// Sigmoid outputs 1/(1+exp(-margin)).
	Sigmoid
	// Softmax outputs exp(m_k)/sum(exp(m)) over the groups.
	Softmax
)

// Model is a parsed tree ensemble.
type Model struct {
	// Objective is XGBoost's objective name.
	Objective string
	// Transform turns margins into outputs.
	Transform Transform
	// Features names the input columns, in order (f0, f1, ... when the
	// file names none).
	Features []string
	// Groups is the number of outputs per row: the classes of
	// multi:softprob, else 1.
	Groups int
	// BaseScore is base_score as written in the file.
	BaseScore float32
	// BaseMargin is the margin every row starts from: base_score mapped
	// through the inverse of the objective's transform, as XGBoost does.
	BaseMargin float32
	// Trees in file order; Tree.Group says which output each feeds.
	Trees []Tree
	// Version is the XGBoost version that wrote the file, if it says.
	Version string
}

// Tree is one regression tree. Nodes[0] is the root.
type Tree struct {
	Group int
	Nodes []Node
}

// Node is a split or a leaf.
type Node struct {
	// Left and Right are child indices; both -1 for a leaf.
	Left, Right int32
	// Feature is the split's input column.
	Feature int32
	// Value is the split threshold (go left when x < Value), or the leaf's
	// output.
	Value float32
	// DefaultLeft sends a missing value (NaN) left.
	DefaultLeft bool
}

// IsLeaf reports whether n is a leaf.
func (n Node) IsLeaf() bool { return n.Left < 0 }

// Depth returns the number of splits on the tree's longest path.
func (t *Tree) Depth() int { return t.DepthAt(0) }

// DepthAt returns the number of splits on the longest path down from node
// i: 0 for a leaf.
func (t *Tree) DepthAt(i int32) int {
	n := t.Nodes[i]
	if n.IsLeaf() {
		return 0
	}
	return 1 + max(t.DepthAt(n.Left), t.DepthAt(n.Right))
}

// Splits returns the number of reachable split nodes and leaves.
func (t *Tree) Splits() (splits, leaves int) {
	var walk func(i int32)
	walk = func(i int32) {
		n := t.Nodes[i]
		if n.IsLeaf() {
			leaves++
			return
		}
		splits++
		walk(n.Left)
		walk(n.Right)
	}
	walk(0)
	return
}

// ReadFile reads and parses a model file, naming it in any error.
func ReadFile(path string) (*Model, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	m, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return m, nil
}

// The file's JSON, as far as this package reads it.
type fileJSON struct {
	Learner *struct {
		FeatureNames     []string          `json:"feature_names"`
		FeatureTypes     []string          `json:"feature_types"`
		LearnerModelParm map[string]string `json:"learner_model_param"`
		Objective        struct {
			Name string `json:"name"`
		} `json:"objective"`
		GradientBooster *struct {
			Name  string `json:"name"`
			Model *struct {
				Trees    []treeJSON `json:"trees"`
				TreeInfo []int      `json:"tree_info"`
			} `json:"model"`
		} `json:"gradient_booster"`
	} `json:"learner"`
	Version []int `json:"version"`
}

type treeJSON struct {
	LeftChildren    []int32           `json:"left_children"`
	RightChildren   []int32           `json:"right_children"`
	SplitIndices    []int64           `json:"split_indices"`
	SplitConditions []float64         `json:"split_conditions"`
	DefaultLeft     []flexBool        `json:"default_left"`
	SplitType       []int             `json:"split_type"`
	TreeParam       map[string]string `json:"tree_param"`
}

// flexBool accepts 0/1 (XGBoost 1.x) and true/false.
type flexBool bool

func (b *flexBool) UnmarshalJSON(data []byte) error {
	switch string(data) {
	case "1", "true":
		*b = true
	case "0", "false":
		*b = false
	default:
		return fmt.Errorf("default_left value %s is not 0, 1, true or false", data)
	}
	return nil
}

// Parse parses an XGBoost JSON model and checks it completely: every
// index in range, every tree a tree, every number finite.
func Parse(data []byte) (*Model, error) {
	if len(data) > MaxFileSize {
		return nil, fmt.Errorf("%w: %d bytes, over the %d byte limit", ErrInvalid, len(data), MaxFileSize)
	}
	trimmed := bytes.TrimSpace(data)
	if len(trimmed) > 0 && trimmed[0] != '{' {
		return nil, fmt.Errorf("%w: not JSON (binary .ubj or .model files are not supported; save the model with save_model(\"model.json\"))", ErrInvalid)
	}
	var f fileJSON
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	l := f.Learner
	if l == nil || l.GradientBooster == nil {
		return nil, fmt.Errorf("%w: no learner.gradient_booster; is this a model saved with save_model(\"model.json\")?", ErrInvalid)
	}
	if name := l.GradientBooster.Name; name != "gbtree" {
		return nil, fmt.Errorf("%w: booster %q; only gbtree is supported (train with booster=\"gbtree\")", ErrUnsupported, name)
	}
	gm := l.GradientBooster.Model
	if gm == nil {
		return nil, fmt.Errorf("%w: gradient_booster has no model", ErrInvalid)
	}
	m := &Model{Objective: l.Objective.Name}
	if len(f.Version) == 3 {
		m.Version = fmt.Sprintf("%d.%d.%d", f.Version[0], f.Version[1], f.Version[2])
	}
	nfeat, err := intParam(l.LearnerModelParm, "num_feature", 0)
	if err != nil {
		return nil, err
	}
	if nfeat <= 0 || nfeat > MaxFeatures {
		return nil, fmt.Errorf("%w: num_feature is %d; want 1 to %d", ErrInvalid, nfeat, MaxFeatures)
	}
	if nt, err := intParam(l.LearnerModelParm, "num_target", 1); err != nil {
		return nil, err
	} else if nt > 1 {
		return nil, fmt.Errorf("%w: num_target is %d; multi-target models are not supported", ErrUnsupported, nt)
	}
	if err := m.setFeatures(l.FeatureNames, l.FeatureTypes, nfeat); err != nil {
		return nil, err
	}
	nclass, err := intParam(l.LearnerModelParm, "num_class", 0)
	if err != nil {
		return nil, err
	}
	m.BaseScore, err = baseScore(l.LearnerModelParm["base_score"])
	if err != nil {
		return nil, err
	}
	switch m.Objective {
	case BinaryLogistic, RegLogistic:
		m.Transform, m.Groups = Sigmoid, 1
		if !(m.BaseScore > 0 && m.BaseScore < 1) {
			return nil, fmt.Errorf("%w: base_score %v is not a probability strictly between 0 and 1, as %s needs", ErrInvalid, m.BaseScore, m.Objective)
		}
		// XGBoost's ProbToMargin, in float32 as XGBoost computes it.
		m.BaseMargin = -float32(math.Log(float64(float32(1)/m.BaseScore - 1)))
	case BinaryLogitRaw, RegSquaredError:
		m.Transform, m.Groups, m.BaseMargin = Identity, 1, m.BaseScore
	case MultiSoftprob:
		if nclass < 2 || nclass > MaxClasses {
			return nil, fmt.Errorf("%w: multi:softprob with num_class %d; want 2 to %d", ErrInvalid, nclass, MaxClasses)
		}
		m.Transform, m.Groups, m.BaseMargin = Softmax, nclass, m.BaseScore
	case "":
		return nil, fmt.Errorf("%w: no objective", ErrInvalid)
	default:
		return nil, fmt.Errorf("%w: objective %q; supported are %s, %s, %s, %s and %s", ErrUnsupported, m.Objective,
			BinaryLogistic, RegLogistic, BinaryLogitRaw, RegSquaredError, MultiSoftprob)
	}
	if len(gm.TreeInfo) != len(gm.Trees) {
		return nil, fmt.Errorf("%w: %d trees but %d tree_info entries", ErrInvalid, len(gm.Trees), len(gm.TreeInfo))
	}
	if len(gm.Trees) == 0 {
		return nil, fmt.Errorf("%w: the model has no trees", ErrInvalid)
	}
	total := 0
	for i, tj := range gm.Trees {
		total += len(tj.LeftChildren)
		if total > MaxNodes {
			return nil, fmt.Errorf("%w: more than %d nodes in all", ErrUnsupported, MaxNodes)
		}
		t, err := parseTree(tj, nfeat)
		if err != nil {
			return nil, fmt.Errorf("tree %d: %w", i, err)
		}
		g := gm.TreeInfo[i]
		if g < 0 || g >= m.Groups {
			return nil, fmt.Errorf("%w: tree %d feeds output group %d, but the model has %d", ErrInvalid, i, g, m.Groups)
		}
		t.Group = g
		m.Trees = append(m.Trees, t)
	}
	return m, nil
}

func (m *Model) setFeatures(names, types []string, n int) error {
	for i, t := range types {
		if t != "" && t != "float" && t != "q" && t != "int" && t != "i" {
			return fmt.Errorf("%w: feature %d has type %q; only numeric features are supported", ErrUnsupported, i, t)
		}
	}
	if len(names) == 0 {
		m.Features = make([]string, n)
		for i := range m.Features {
			m.Features[i] = "f" + strconv.Itoa(i)
		}
		return nil
	}
	if len(names) != n {
		return fmt.Errorf("%w: %d feature_names for num_feature %d", ErrInvalid, len(names), n)
	}
	seen := make(map[string]bool, n)
	for i, s := range names {
		if s == "" || seen[s] {
			return fmt.Errorf("%w: feature name %d (%q) is empty or repeated", ErrInvalid, i, s)
		}
		seen[s] = true
	}
	m.Features = names
	return nil
}

func intParam(p map[string]string, key string, def int) (int, error) {
	s, ok := p[key]
	if !ok {
		return def, nil
	}
	v, err := strconv.Atoi(s)
	if err != nil {
		return 0, fmt.Errorf("%w: learner_model_param %s %q is not an integer", ErrInvalid, key, s)
	}
	return v, nil
}

// baseScore parses base_score: "5E-1" (XGBoost 1.x) or "[5E-1]" (2.x).
func baseScore(s string) (float32, error) {
	if s == "" {
		return 0.5, nil
	}
	v := strings.TrimSuffix(strings.TrimPrefix(s, "["), "]")
	if strings.Contains(v, ",") {
		return 0, fmt.Errorf("%w: base_score %q has several values; multi-target models are not supported", ErrUnsupported, s)
	}
	f, err := strconv.ParseFloat(v, 32)
	if err != nil || math.IsInf(f, 0) || math.IsNaN(f) {
		return 0, fmt.Errorf("%w: base_score %q is not a finite number", ErrInvalid, s)
	}
	return float32(f), nil
}

func parseTree(tj treeJSON, nfeat int) (Tree, error) {
	n := len(tj.LeftChildren)
	if n == 0 {
		return Tree{}, fmt.Errorf("%w: no nodes", ErrInvalid)
	}
	if len(tj.RightChildren) != n || len(tj.SplitIndices) != n || len(tj.SplitConditions) != n || len(tj.DefaultLeft) != n {
		return Tree{}, fmt.Errorf("%w: node arrays differ in length (left_children %d, right_children %d, split_indices %d, split_conditions %d, default_left %d)",
			ErrInvalid, n, len(tj.RightChildren), len(tj.SplitIndices), len(tj.SplitConditions), len(tj.DefaultLeft))
	}
	if s, ok := tj.TreeParam["num_nodes"]; ok && s != strconv.Itoa(n) {
		return Tree{}, fmt.Errorf("%w: tree_param num_nodes %s but %d nodes", ErrInvalid, s, n)
	}
	if s := tj.TreeParam["size_leaf_vector"]; s != "" && s != "0" && s != "1" {
		return Tree{}, fmt.Errorf("%w: vector leaves (size_leaf_vector %s) are not supported", ErrUnsupported, s)
	}
	t := Tree{Nodes: make([]Node, n)}
	for i := range t.Nodes {
		l, r := tj.LeftChildren[i], tj.RightChildren[i]
		v := float32(tj.SplitConditions[i])
		if math.IsInf(float64(v), 0) || math.IsNaN(float64(v)) {
			return Tree{}, fmt.Errorf("%w: node %d: value %v is not a finite float32", ErrInvalid, i, tj.SplitConditions[i])
		}
		nd := Node{Left: l, Right: r, Value: v, DefaultLeft: bool(tj.DefaultLeft[i]), Feature: -1}
		if l == -1 && r == -1 {
			t.Nodes[i] = nd
			continue
		}
		if l <= 0 || r <= 0 || int(l) >= n || int(r) >= n || l == r {
			return Tree{}, fmt.Errorf("%w: node %d has children %d and %d; want two distinct nodes in 1..%d, or -1 and -1 for a leaf", ErrInvalid, i, l, r, n-1)
		}
		if i < len(tj.SplitType) && tj.SplitType[i] != 0 {
			return Tree{}, fmt.Errorf("%w: node %d is a categorical split; only numeric splits are supported", ErrUnsupported, i)
		}
		f := tj.SplitIndices[i]
		if f < 0 || f >= int64(nfeat) {
			return Tree{}, fmt.Errorf("%w: node %d splits on feature %d, outside the model's %d features", ErrInvalid, i, f, nfeat)
		}
		nd.Feature = int32(f)
		t.Nodes[i] = nd
	}
	// The nodes reachable from the root must form a tree: no node reached
	// twice (which would also catch cycles), no path deeper than MaxDepth.
	seen := make([]bool, n)
	type item struct{ node, depth int32 }
	stack := []item{{0, 0}}
	for len(stack) > 0 {
		it := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if seen[it.node] {
			return Tree{}, fmt.Errorf("%w: node %d is reached twice; the children arrays do not form a tree", ErrInvalid, it.node)
		}
		seen[it.node] = true
		nd := t.Nodes[it.node]
		if nd.IsLeaf() {
			continue
		}
		if it.depth >= MaxDepth {
			return Tree{}, fmt.Errorf("%w: deeper than %d levels", ErrUnsupported, MaxDepth)
		}
		stack = append(stack, item{nd.Left, it.depth + 1}, item{nd.Right, it.depth + 1})
	}
	return t, nil
}

// Eval returns the tree's leaf value for row x (len(x) >= the features).
func (t *Tree) Eval(x []float32) float32 {
	nodes := t.Nodes
	i := int32(0)
	for {
		n := &nodes[i]
		if n.Left < 0 {
			return n.Value
		}
		v := x[n.Feature]
		switch {
		case v < n.Value:
			i = n.Left
		case v != v: // NaN: missing
			if n.DefaultLeft {
				i = n.Left
			} else {
				i = n.Right
			}
		default:
			i = n.Right
		}
	}
}

// Margins writes the row's margins (one per group) into out.
func (m *Model) Margins(x []float32, out []float32) {
	for g := range out[:m.Groups] {
		out[g] = m.BaseMargin
	}
	for i := range m.Trees {
		t := &m.Trees[i]
		out[t.Group] += t.Eval(x)
	}
}

// Predict writes the row's outputs (one per group) into out, as XGBoost's
// Booster.predict would.
func (m *Model) Predict(x []float32, out []float32) {
	m.Margins(x, out)
	switch m.Transform {
	case Sigmoid:
		out[0] = float32(1 / (1 + math.Exp(-float64(out[0]))))
	case Softmax:
		SoftmaxInPlace(out[:m.Groups])
	}
}

// SoftmaxInPlace replaces v by its softmax, computed in float64.
func SoftmaxInPlace(v []float32) {
	mx := math.Inf(-1)
	for _, x := range v {
		mx = math.Max(mx, float64(x))
	}
	sum := 0.0
	for _, x := range v {
		sum += math.Exp(float64(x) - mx)
	}
	for i, x := range v {
		v[i] = float32(math.Exp(float64(x)-mx) / sum)
	}
}
