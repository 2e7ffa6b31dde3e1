// Package layout holds the test that guards the repository's dependency
// graph: the agent and the controller never import each other, and the
// operator side reaches the controller only through its HTTP API.
package layout
